"""Peak RSS of a job on a generated 10,000,000-row csv (~640 MB; files larger than memory, runner/streaming.py).

    python benchmarks/bench_big_file.py [--rows 10000000]

The rows are SST-2 training sentences drawn with replacement, each made distinct by a number. The job is
``mode=head_only train.max_steps=100`` on its defaults (the file is above data.streaming_above_mb, so its
texts stay on disk), peak RSS from GNU time. Results go to ``benchmarks/results.json`` under ``big_file``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, shared_file, store, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    source = shared_file("sst2", "train.csv")
    import numpy as np
    import pandas as pd

    work = Path(tempfile.mkdtemp(prefix="bench-big-"))
    sst = pd.read_csv(source)
    rng = np.random.default_rng(0)
    path = work / "big.csv"
    for start in range(0, args.rows, 1_000_000):  # written a million rows at a time
        pick = rng.integers(0, len(sst), min(1_000_000, args.rows - start))
        frame = pd.DataFrame({"text": sst.text.values[pick], "label": sst.label.values[pick]})
        frame["text"] = frame["text"].str.strip() + " #" + pd.Series(np.arange(start, start + len(pick))).astype(str)
        frame.to_csv(path, index=False, header=start == 0, mode="w" if start == 0 else "a")
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
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
