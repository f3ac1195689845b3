"""A folder-per-class corpus of 100,000 small files (one SST-2 sentence each, made distinct by a number):
reading it, side by side with scikit-learn's ``load_files`` on the same folder, then a whole job.

    python benchmarks/bench_folder.py [--files 100000]

Reading: the runner's reader (runner.sources, as ``data.train=<folder>`` reads it) and
``sklearn.datasets.load_files(folder, encoding="utf-8")`` alternate in one process, three rounds after a
warm-up pass (both read from the page cache: what is compared is the work per file); the median of each.
The job: ``python -m runner model=tiny mode=head_only data.train=<folder> train.epochs=1`` (read, tokenize,
encode each text once with the frozen tiny encoder, train the head one epoch), time and peak RSS from GNU
time. Results go to ``benchmarks/results.json`` under ``folder``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, shared_file, store, timed  # noqa: E402


def make_corpus(root: Path, files: int) -> None:
    import numpy as np
    import pandas as pd

    sst = pd.read_csv(shared_file("sst2", "train.csv"))
    pick = np.random.default_rng(0).integers(0, len(sst), files)
    for name in ("neg", "pos"):
        (root / name).mkdir(parents=True)
    for i, row in enumerate(pick):
        label = "pos" if sst.label.values[row] == 1 else "neg"
        (root / label / f"{i:07d}.txt").write_text(f"{str(sst.text.values[row]).strip()} #{i}\n")


def read_side_by_side(root: Path, rounds: int = 3) -> dict:
    from sklearn.datasets import load_files

    from runner import sources
    from runner.schema import DataConfig

    cfg = DataConfig(train=str(root))
    ours, theirs = [], []
    load_files(str(root), encoding="utf-8")  # warm-up: both then read from the page cache
    for _ in range(rounds):
        tic = time.perf_counter()
        frame = sources.read_class_folder(cfg, str(root), "train", None)
        ours.append(time.perf_counter() - tic)
        tic = time.perf_counter()
        bunch = load_files(str(root), encoding="utf-8")
        theirs.append(time.perf_counter() - tic)
    assert len(frame) == len(bunch.data), (len(frame), len(bunch.data))
    assert sorted(frame["text"]) == sorted(t.removesuffix("\n") for t in bunch.data)  # the same texts
    runner_s, sklearn_s = statistics.median(ours), statistics.median(theirs)
    return {"runner_read_s": round(runner_s, 2), "sklearn_load_files_s": round(sklearn_s, 2),
            "runner_vs_load_files": round(sklearn_s / runner_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-folder-"))
    root = work / "corpus"
    make_corpus(root, args.files)
    results = {"files": args.files, **read_side_by_side(root)}
    seconds, peak, _ = timed([sys.executable, "-m", "runner", "model=tiny", "mode=head_only", "data=csv",
                              f"data.train={root}", "train.epochs=1", "train.progress=false", "tracking.enabled=false",
                              "save_model=false", f"cache.dir={work / 'cache'}", f"hydra.run.dir={work / 'run'}"], ROOT)
    metrics = json.loads((work / "run" / "metrics.json").read_text())["metrics"]
    sources = json.loads((work / "run" / "data_sources.json").read_text())
    results.update({"job_seconds": round(seconds, 1), "job_peak_rss_mb": round(peak),
                    "rows_read": sum(c["rows"] for c in sources), "val/accuracy": round(metrics["val/accuracy"], 4)})
    print(json.dumps(results, indent=2))
    store("folder", results)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
