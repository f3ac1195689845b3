"""What a search trial costs on cached features, and what pruning saves, side by side in one script.

    python benchmarks/bench_search.py [--trials 32] [--folds 5] [--part cached|pruning|all]

Each contender is one search command in its own process, one after the other (these machines are noisy):

- ``cached``: ``experiment=trec_kfold_search`` on TREC train with ``cv.folds`` folds (MiniLM features from the
  disk cache, filled by a first job that is not timed): whole-search wall time per trial, the search's own
  ``sweep/seconds_per_trial``, and the best cv accuracy;
- ``pruning``: the same TPE search (fixed sampler seed) of full fine-tuning on the first 1,000 TREC rows,
  3 folds, 12 trials over lr 1e-6..1e-3, without and with ``MedianPruner``: wall time, trainings run and
  saved, best cv accuracy.

Results go to ``benchmarks/results.json`` under ``search``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import shared_file, store, timed  # noqa: E402

RUNNER = [sys.executable, "-m", "runner"]


def account(out: str) -> dict[str, float]:
    """The search's own account (sweep/...) and its best value, from its log."""
    found = {k: float(v) for k, v in re.findall(r"(sweep/\w+)=([\d.eE+-]+)", out)}
    best = re.search(r"best of [^:]+: .* = ([\d.]+)", out)
    return {**found, "best": float(best.group(1)) if best else float("nan")}


def cached_search(trials: int, folds: int, work: Path) -> dict:
    train, test = shared_file("trec", "train.csv"), shared_file("trec", "test.csv")
    data = ["data=csv", f"data.train={train}", f"data.test={test}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            f"cache.dir={work / 'cache'}", "train.progress=false"]
    timed([*RUNNER, "mode=head_only", "train.max_steps=1", *data], work)  # fills the feature cache: not timed
    seconds, peak, out = timed([*RUNNER, "experiment=trec_kfold_search", f"cv.folds={folds}",
                                f"hydra.sweeper.n_trials={trials}", f"hydra.sweeper.storage=sqlite:///{work / 'optuna.db'}",
                                *data], work)
    return {"trials": trials, "folds": folds, "seconds": round(seconds, 1), "seconds_per_trial": round(seconds / trials, 2),
            "peak_rss_mb": round(peak), **account(out)}


def pruning_search(work: Path) -> dict:
    import pandas as pd

    rows = pd.read_csv(shared_file("trec", "train.csv")).head(1000)
    rows.to_csv(work / "trec1000.csv", index=False)
    common = ["-m", "hparams_search=full_lr", "data=csv", f"data.train={work / 'trec1000.csv'}", "cv.folds=3",
              "hydra.sweeper.n_trials=12", "train.progress=false", "train.lr=tag(log,interval(1e-6,1e-3))",
              f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]
    results = {}
    for name, extra in (("unpruned", ["hydra.sweeper.pruner=null"]),
                        ("pruned", ["hydra.sweeper.pruner={_target_: optuna.pruners.MedianPruner, n_startup_trials: 3}"])):
        seconds, peak, out = timed([*RUNNER, *common, *extra, f"hydra.sweeper.study_name=bench-{name}",
                                    f"hydra.sweeper.storage=sqlite:///{work / f'{name}.db'}"], work)
        results[name] = {"seconds": round(seconds, 1), "peak_rss_mb": round(peak), **account(out)}
    results["ratio"] = round(results["pruned"]["seconds"] / results["unpruned"]["seconds"], 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--part", choices=["cached", "pruning", "all"], default="all")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("cached", "all"):
            (Path(tmp) / "cached").mkdir()
            results["cached"] = cached_search(args.trials, args.folds, Path(tmp) / "cached")
            print("cached-features search:", results["cached"])
        if args.part in ("pruning", "all"):
            (Path(tmp) / "pruning").mkdir()
            results["pruning"] = pruning_search(Path(tmp) / "pruning")
            print("pruned vs unpruned:", results["pruning"])
    store("search", results)


if __name__ == "__main__":
    main()
