"""Peak RSS of a job on a generated 1,000,000-row csv (files larger than memory, runner/streaming.py).

    python benchmarks/bench_big_file.py [--rows 1000000]

The rows are SST-2 training sentences drawn with replacement, each made distinct by a number. The job is
``mode=head_only train.max_steps=100`` on its defaults (the file is above data.streaming_above_mb, so its
texts stay on disk), peak RSS from GNU time. Results go to ``benchmarks/results.json`` under ``big_file``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, shared_file, store, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    source = shared_file("sst2", "train.csv")
    import numpy as np
    import pandas as pd

    work = Path(tempfile.mkdtemp(prefix="bench-big-"))
    sst = pd.read_csv(source)
    pick = np.random.default_rng(0).integers(0, len(sst), args.rows)
    frame = pd.DataFrame({"text": sst.text.values[pick], "label": sst.label.values[pick]})
    frame["text"] = frame["text"].str.strip() + " #" + pd.Series(np.arange(args.rows)).astype(str)
    path = work / "big.csv"
    frame.to_csv(path, index=False)
    del frame, sst
    seconds, peak, _ = timed([sys.executable, "-m", "runner", "mode=head_only", "data=csv", f"data.train={path}",
                              "data.validation_split=0.001", "train.max_steps=100", "train.progress=false",
                              "tracking.enabled=false", "save_model=false", f"hydra.run.dir={work / 'run'}"], ROOT,
                             env={"RUNNER_ARROW_CACHE": str(work / "arrow")})
    metrics = json.loads((work / "run" / "metrics.json").read_text())["metrics"]
    results = {"rows": args.rows, "file_mb": round(path.stat().st_size / 2**20), "seconds": round(seconds, 1),
               "peak_rss_mb": round(peak), "val/accuracy": round(metrics["val/accuracy"], 4)}
    print(json.dumps(results, indent=2))
    store("big_file", results)


if __name__ == "__main__":
    main()
