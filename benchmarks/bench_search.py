"""What a search trial costs on cached features, and what pruning saves, side by side in one script.

    python benchmarks/bench_search.py [--trials 32] [--folds 5] [--part cached|trec|sst2|all]

Each contender is one search command in its own process, one after the other (these machines are noisy):

- ``cached``: ``experiment=trec_kfold_search`` on TREC train with ``cv.folds`` folds (MiniLM features from the
  disk cache, filled by a first job that is not timed): whole-search wall time per trial, the search's own
  ``sweep/seconds_per_trial``, and the best cv accuracy;
- ``trec``: the same TPE search (fixed sampler seed) of full fine-tuning (``hparams_search=full_lr``) on the
  first 1,000 TREC rows, 3 folds, 12 trials over lr 1e-6..1e-3, with ``hydra.sweeper.pruner=null`` and with
  the preset's pruner: wall time, trainings run and saved, best cv accuracy;
- ``sst2``: the same for a single-split search on the first 1,000 SST-2 rows (validation: SST-2 dev), 10
  trials of 2 epochs, an evaluation every 8 steps.

Results go to ``benchmarks/results.json`` under ``search``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, shared_file, store, timed  # noqa: E402

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


def pruned_and_not(work: Path, name: str, common: list[str]) -> dict:
    """The same search without a pruner and with the preset's (the top quarter after the first fold or second
    evaluation, from the second trial on)."""
    results = {}
    for label, extra in (("unpruned", ["hydra.sweeper.pruner=null"]), ("pruned", [])):
        seconds, peak, out = timed([*RUNNER, *common, *extra, f"hydra.sweeper.study_name=bench-{name}-{label}",
                                    f"hydra.sweeper.storage=sqlite:///{work / f'{name}-{label}.db'}",
                                    f"hydra.sweep.dir={work / f'{name}-{label}'}"], work)
        results[label] = {"seconds": round(seconds, 1), "peak_rss_mb": round(peak), **account(out)}
    results["pruned"]["ratio"] = round(results["pruned"]["seconds"] / results["unpruned"]["seconds"], 3)
    results["pruned"]["best_difference"] = round(results["pruned"]["best"] - results["unpruned"]["best"], 4)
    return results


def trec_search(work: Path) -> dict:
    import pandas as pd

    pd.read_csv(shared_file("trec", "train.csv")).head(1000).to_csv(work / "trec1000.csv", index=False)
    return pruned_and_not(work, "trec", [
        "-m", "hparams_search=full_lr", "data=csv", f"data.train={work / 'trec1000.csv'}", "cv.folds=3",
        "hydra.sweeper.n_trials=12", "train.progress=false", "train.lr=tag(log,interval(1e-6,1e-3))",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=bench-trec"])


def sst2_search(work: Path) -> dict:
    import pandas as pd

    pd.read_csv(shared_file("sst2", "train.csv")).head(1000).to_csv(work / "sst2-1000.csv", index=False)
    return pruned_and_not(work, "sst2", [
        "-m", "hparams_search=full_lr", "data=csv", f"data.train={work / 'sst2-1000.csv'}",
        f"data.validation={shared_file('sst2', 'dev.csv')}", "hydra.sweeper.n_trials=10", "train.epochs=2",
        "train.eval_every=8", "train.progress=false", "train.lr=tag(log,interval(1e-6,1e-3))",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=bench-sst2"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--part", choices=["cached", "trec", "sst2", "all"], default="all")
    parser.add_argument("--keep", type=Path, help="work here and keep the searches (default: a temporary folder)")
    args = parser.parse_args()
    stored = json.loads(RESULTS.read_text()).get("search", {}) if RESULTS.exists() else {}
    results = {k: v for k, v in stored.items() if k in ("cached", "trec", "sst2")}  # a part run alone keeps the others
    parts = {"cached": lambda work: cached_search(args.trials, args.folds, work), "trec": trec_search, "sst2": sst2_search}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.keep or tmp
        for name, part in parts.items():
            if args.part in (name, "all"):
                (Path(tmp) / name).mkdir(parents=True, exist_ok=True)
                results[name] = part(Path(tmp) / name)
                print(f"{name}:", json.dumps(results[name]))
    store("search", results)


if __name__ == "__main__":
    main()
