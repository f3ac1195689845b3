"""K-fold cross-validation inside one job, so one sweep trial is one whole CV and its objective the fold mean.

Folds come from the training data (stratified by class, or by quantile bins of a regression target);
each fold's held-out part is its validation set, and ``data.test``, if given, is scored by every fold's
model. Every fold is a nested MLflow run tagged ``fold=i``; the job's run gets ``cv/<metric>_mean`` and
``cv/<metric>_std`` for every metric and a per-fold table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import numpy as np

from runner import checkpoint, runfolder
from runner.artifact import save_trained
from runner.data import Dataset
from runner.errors import RunnerError
from runner.experiment import FitResult, fit_and_evaluate
from runner.features import FrozenFeatures
from runner.report import run_report
from runner.schema import CVConfig, Direction, KeepModels
from runner.spec import Run
from runner.tracking import Tracker

log = logging.getLogger("runner")


def make_folds(targets: np.ndarray | None, cfg: CVConfig, rows: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, held-out indices) per fold.

    Class ids are stratified directly: every fold holds floor or ceil of (class count / k) of each class.
    Float targets (regression) are stratified by ``cfg.bins`` quantile bins. Triplets (no targets) and
    multi-label rows are split at random.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    k, n = cfg.folds, len(targets) if targets is not None else rows
    if k < 2 or k > n:
        raise RunnerError(f"cv.folds={k}: needs 2 <= folds <= the {n} training rows")
    if not cfg.stratify or targets is None or targets.ndim != 1:
        splitter, groups = KFold(k, shuffle=True, random_state=cfg.seed), None
    else:
        groups = quantile_bins(targets, cfg.bins) if np.issubdtype(targets.dtype, np.floating) else targets
        counts = np.bincount(groups)
        if counts[counts > 0].min() < k:
            raise RunnerError(
                f"cv.folds={k} but a class has only {counts[counts > 0].min()} training rows: "
                f"lower cv.folds, or set cv.stratify=false"
            )
        splitter = StratifiedKFold(k, shuffle=True, random_state=cfg.seed)
    return list(splitter.split(np.zeros(n), groups))


def check_folds(data: Dataset, cfg: CVConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """The folds, after checking the fold settings fit this data (also called before any run opens). The same
    targets and settings give the same folds: the trials of a search in one process split once (runner/reuse.py)."""
    import hashlib

    from runner import reuse

    labels = data.train.labels
    digest = None if labels is None else [labels.dtype.str, labels.shape,
                                          hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest()]
    folds = reuse.shared("folds", [cfg.folds, cfg.stratify, cfg.bins, cfg.seed, len(data.train), digest],
                         lambda: make_folds(labels, cfg, len(data.train)))
    if cfg.only_fold is not None and not 0 <= cfg.only_fold < cfg.folds:
        raise RunnerError(f"cv.only_fold={cfg.only_fold} must be in 0..{cfg.folds - 1}")
    return folds


def quantile_bins(values: np.ndarray, bins: int) -> np.ndarray:
    """Bin ids 0..bins-1 by quantiles, so each bin holds about the same number of rows."""
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.digitize(values, edges)


def aggregate(rows: list[dict[str, float]]) -> dict[str, float]:
    """``cv/<metric>_mean`` and ``cv/<metric>_std`` (population std, as ``scores.std()``) per metric."""
    out = {}
    for name in rows[0]:
        if name == "fold":
            continue
        values = np.array([r[name] for r in rows], dtype=float)
        out[f"cv/{name}_mean"], out[f"cv/{name}_std"] = float(values.mean()), float(values.std())
    return out


def cross_validate(run: Run, data: Dataset, tokenizer, accelerator, tracker: Tracker, out: Path,
                   frozen: FrozenFeatures | None = None) -> dict:
    """Train and evaluate one model per fold; returns the job summary (objective = fold mean).

    Each fold works in ``out/folds/fold-i``: its checkpoints while it trains, ``result.json`` once it
    has finished. A resumed job reuses finished folds and resumes the fold that was interrupted.
    """
    cfg = run.cfg
    folds = check_folds(data, cfg.cv)
    chosen = range(cfg.cv.folds) if cfg.cv.only_fold is None else [cfg.cv.only_fold]
    sign = 1 if cfg.objective.direction == Direction.maximize else -1
    rows, reports, best, model = [], {}, None, None
    pending = [i for i in chosen if not (out / "folds" / f"fold-{i}" / "result.json").exists()]
    fold_data = {i: fold_dataset(data, folds[i]) for i in pending}
    together = folds_together(run, fold_data, folds, tokenizer, accelerator, tracker, out, frozen)
    # of the folds trained together, only the best can be the job's saved model (keep_models=best)
    best_together = max(together, key=lambda i: sign * together[i].metrics[cfg.objective.metric], default=None)
    for i in chosen:
        workdir = out / "folds" / f"fold-{i}"
        done = workdir / "result.json"
        result = None
        if done.exists():
            log.info("fold-%d (%d of %d) finished before this run was resumed: reusing its metrics", i, i + 1, cfg.cv.folds)
            saved = json.loads(done.read_text())
            metrics, report = saved["metrics"], saved["reports"]
        else:
            result = together.get(i) or run_fold(run, i, folds[i], fold_data[i], tokenizer, accelerator, tracker, workdir,
                                                 frozen)
            metrics, report, model = result.metrics, result.reports, result.model
        value = metrics[cfg.objective.metric]
        if result is not None and accelerator.is_main_process:
            if cfg.save_model and cfg.cv.keep_models == KeepModels.all:
                save_trained(run, result.model, tokenizer, data.label_names, workdir / "model", metrics)
            elif cfg.save_model and cfg.cv.keep_models == KeepModels.best and (best is None or sign * value > sign * best) \
                    and i in (best_together, *set(chosen) - set(together)):
                save_trained(run, result.model, tokenizer, data.label_names, out / "model", metrics)
            done.parent.mkdir(parents=True, exist_ok=True)  # a fold may have ended before its first checkpoint
            done.write_text(json.dumps({"metrics": metrics, "reports": report}))  # written last: the fold is finished
        rows.append({"fold": i, **metrics})
        reports[f"fold-{i}"] = report
        best = value if best is None or sign * value > sign * best else best
        if run.pruning is not None and not together:  # after the fold's result is on disk: a pruned trial keeps it
            run.pruning.report(i, value, "fold", accelerator, units=(len(rows), len(chosen)))
        checkpoint.crash_point("fold", i)  # between folds (the resume tests kill the job here)
    if run.pruning is not None and together:  # every fold was trained at once: stopping would have saved nothing
        run.pruning.record("fold", len(rows), len(chosen))
    stats = aggregate(rows)
    tracker.log_metrics(stats)
    if accelerator.is_main_process:
        write_fold_table(rows, out / "folds.csv")
        tracker.log_artifact(out / "folds.csv")
    metric = cfg.objective.metric
    log.info("cv: %s", "  ".join(f"{n}={stats[f'cv/{n}_mean']:.4f}±{stats[f'cv/{n}_std']:.4f}"
                                  for n in rows[0] if n != "fold" and n.startswith("val/")))
    return {"objective": {"metric": f"cv/{metric}_mean", "value": stats[f"cv/{metric}_mean"]},
            "metrics": stats, "folds": rows, "reports": reports, "model": model}


def run_fold(run: Run, i: int, split: tuple[np.ndarray, np.ndarray], fold_data: Dataset, tokenizer, accelerator,
             tracker: Tracker, workdir: Path, frozen: FrozenFeatures | None = None) -> FitResult:
    """One fold (``fold_data``: its :func:`fold_dataset`) as a nested MLflow run (continued when resumed)."""
    child = fold_run(run, i, split, tracker, workdir, accelerator)
    with child.closing():
        result = fit_and_evaluate(run, fold_data, tokenizer, accelerator, child, workdir, frozen)
        fold_pictures(run, child, workdir, result, accelerator)
        return result


def folds_together(run: Run, fold_data: dict[int, Dataset], folds: list, tokenizer, accelerator, tracker: Tracker,
                   out: Path, frozen: FrozenFeatures | None) -> dict[int, FitResult]:
    """The pending folds (``fold_data``) trained at once (runner/fold_heads.py) where they can be, each as its own
    nested run; empty where they train one after the other."""
    from runner import fold_heads

    pending = list(fold_data)
    resumable = run.cfg.train.resume != "never" and any(
        (out / "folds" / f"fold-{i}" / "checkpoints").exists() for i in pending)
    if not fold_heads.applies(run, fold_data, frozen, accelerator, resumable):
        return {}
    log.info("folds %s: %d heads trained together on the cached features", ",".join(map(str, pending)), len(pending))
    with contextlib.ExitStack() as stack:
        children = {i: stack.enter_context(fold_run(run, i, folds[i], tracker, out / "folds" / f"fold-{i}",
                                                    accelerator).closing()) for i in pending}
        for child in children.values():  # seconds of training: each fold's metrics written once, as it closes
            child.flush_every = math.inf
        results = fold_heads.fit_folds(run, fold_data, tokenizer, accelerator, children, frozen)
        for i in pending:
            fold_pictures(run, children[i], out / "folds" / f"fold-{i}", results[i], accelerator)
    return results


def fold_dataset(data: Dataset, split: tuple[np.ndarray, np.ndarray]) -> Dataset:
    train_idx, held_idx = split
    return Dataset(data.train.subset(train_idx), data.train.subset(held_idx), data.test, data.label_names)


def fold_run(run: Run, i: int, split: tuple[np.ndarray, np.ndarray], tracker: Tracker, workdir: Path,
             accelerator) -> Tracker:
    """Fold i's nested MLflow run: continued where the fold's folder names an earlier one (a resumed job)."""
    log.info("fold-%d (%d of %d): %d train, %d validation", i, i + 1, run.cfg.cv.folds, len(split[0]), len(split[1]))
    resume_id = runfolder.previous_run_id(workdir) if run.cfg.train.resume != "never" else None
    child = tracker.child(f"fold-{i}", tags={**run.choices, "fold": str(i)}, resume_id=resume_id)
    if accelerator.is_main_process:
        runfolder.record_run_id(workdir, child.run_id)
    return child


def fold_pictures(run: Run, child: Tracker, workdir: Path, result: FitResult, accelerator) -> None:
    """The fold's curves and confusion matrix, where this job draws pictures."""
    if accelerator.is_main_process and run.draws_pictures:
        metric = run.cfg.objective.metric
        summary = {"objective": {"metric": metric, "value": result.metrics[metric]}}
        for picture in run_report(workdir, child.metric_history(), summary, result.reports, metric):
            child.log_artifact(picture, "report")


def write_fold_table(rows: list[dict], path: Path) -> None:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False)
