"""Pictures of a run and of a sweep (matplotlib, headless), and a ``report.md`` that shows them.

Run folder: ``curves.png`` (train/loss and the validation metrics over steps), ``confusion-<split>.png``
(classification), ``scatter-<split>.png`` (predicted against true scores), ``folds.png`` (k-fold: each
fold's objective with the mean ± std band). Sweep folder: ``trials.png`` (the objective of every trial in
order, and the best so far) and ``importances.png`` (Optuna's parameter importances). Every file is also
logged to the MLflow run (or the sweep's parent run) under ``report/``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger("runner")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def curves(history: dict[str, list[tuple[int, float]]], objective: str, path: Path) -> Path | None:
    """train/loss on the left; every val/ metric (the objective drawn thick) on the right, over steps."""
    val = {k: v for k, v in history.items() if k.startswith("val/") and k != "val/loss"}
    if "train/loss" not in history and not val:
        return None
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train/loss", "val/loss"):
        if key in history:
            steps, values = zip(*history[key])
            left.plot(steps, values, marker=".", label=key)
    left.set(title="loss", xlabel="optimizer step", ylabel="loss")
    left.legend()
    for key, points in sorted(val.items()):
        steps, values = zip(*points)
        right.plot(steps, values, marker="o", linewidth=3 if key == objective else 1, label=key)
    right.set(title=f"validation (objective {objective})", xlabel="optimizer step")
    right.legend(fontsize=7)
    return save(fig, path)


def confusion(report: dict, split: str, path: Path) -> Path:
    plt = pyplot()
    labels, matrix = report["confusion_matrix"]["labels"], np.asarray(report["confusion_matrix"]["matrix"])
    size = max(4, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), [str(x) for x in labels], rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), [str(x) for x in labels])
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set(xlabel="predicted", ylabel="true", title=f"{split}: confusion matrix (accuracy {accuracy:.3f})")
    return save(fig, path)


def scatter(report: dict, split: str, path: Path) -> Path:
    plt = pyplot()
    predicted, true = np.asarray(report["predicted"]), np.asarray(report["true"])
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(true, predicted, s=8, alpha=0.5)
    r = np.corrcoef(predicted, true)[0, 1] if len(true) > 1 else float("nan")
    ax.set(xlabel="true score", ylabel=report.get("predicted_name", "predicted"), title=f"{split}: predicted vs true (r={r:.3f})")
    return save(fig, path)


def folds(rows: list[dict], metric: str, path: Path) -> Path:
    plt = pyplot()
    values = np.array([row[metric] for row in rows])
    mean, std = values.mean(), values.std()  # population std, as cv/<metric>_std
    fig, ax = plt.subplots(figsize=(max(4, len(rows) + 2), 4))
    ax.bar([f"fold-{row['fold']}" for row in rows], values, color="tab:blue")
    ax.axhline(mean, color="black", label=f"mean {mean:.4f}")
    ax.axhspan(mean - std, mean + std, color="grey", alpha=0.3, label=f"± std {std:.4f}")
    ax.set(ylabel=metric, title=f"{metric} per fold")
    ax.set_ylim(max(0.0, values.min() - 3 * std - 0.05), values.max() + 3 * std + 0.05)
    ax.legend()
    return save(fig, path)


def run_report(out: Path, history: dict, summary: dict, reports: dict, objective: str) -> list[Path]:
    """The pictures of one job, and report.md; returns the files written."""
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)  # a fold's folder may not exist yet (no checkpoint written)
    files = [curves(history, objective.removeprefix("cv/").removesuffix("_mean"), folder / "curves.png")]
    for split, report in (reports or {}).items():
        if split.startswith("fold-") or not report:
            continue
        if "confusion_matrix" in report:
            files.append(confusion(report, split, folder / f"confusion-{split}.png"))
        if "predicted" in report:
            files.append(scatter(report, split, folder / f"scatter-{split}.png"))
    if summary.get("folds"):
        metric = objective.removeprefix("cv/").removesuffix("_mean")
        files.append(folds(summary["folds"], metric, folder / "folds.png"))
    files = [f for f in files if f is not None]
    lines = [f"# {out.name}", "", f"Objective `{summary['objective']['metric']}` = {summary['objective']['value']:.4f}", ""]
    lines += [f"![{f.stem}]({f.name})\n" for f in files]
    (folder / "report.md").write_text("\n".join(lines))
    return [*files, folder / "report.md"]


def sweep_report(sweep_dir: Path, table, study=None) -> list[Path]:
    """trials.png (objective per trial, best so far) and importances.png (Optuna studies), report.md."""
    plt = pyplot()
    folder = sweep_dir / "report"
    folder.mkdir(exist_ok=True)
    files = []
    done = table.dropna(subset=["value"]).copy()
    if len(done):
        done["order"] = done["job"].astype(str).str.extract(r"(\d+)", expand=False).astype(float)
        done = done.sort_values("order")
        maximize = study is None or study.directions[0].name == "MAXIMIZE"  # the first objective (Pareto searches)
        pruned = done["status"] == "PRUNED"
        finished = done[~pruned]
        best = (finished["value"].cummax() if maximize else finished["value"].cummin()) if len(finished) else None
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.scatter(finished["order"], finished["value"], label="trial")
        if pruned.any():  # where the pruner stopped them: the last value they reported
            ax.scatter(done[pruned]["order"], done[pruned]["value"], marker="x", color="tab:gray",
                       label="pruned (last reported value)")
        if best is not None:
            ax.step(finished["order"], best, where="post", color="tab:red", label="best so far")
        name = str(done["objective"].iloc[0]) + (" (mean over folds)" if done["cv_std"].notna().any() else "")
        ax.set(xlabel="trial (job number)", ylabel=name, title="objective per trial")
        ax.legend()
        files.append(save(fig, folder / "trials.png"))
    if study is not None:
        import optuna

        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(complete) >= 2 and len(complete[0].params) >= 1:
            with warnings.catch_warnings():  # "quantiles select the same set of trials": a note, not a problem
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(study, target=lambda t: t.values[0])
            fig, ax = plt.subplots(figsize=(6, 0.5 * len(importances) + 1.5))
            ax.barh(list(importances)[::-1], list(importances.values())[::-1])
            ax.set(xlabel="importance (fANOVA)", title=f"parameter importances ({len(complete)} trials)")
            files.append(save(fig, folder / "importances.png"))
    lines = [f"# sweep {sweep_dir.name}", "", "Best first: `summary.csv`.", "", *[f"![{f.stem}]({f.name})\n" for f in files]]
    (folder / "report.md").write_text("\n".join(lines))
    return [*files, folder / "report.md"]


def pareto_report(sweep_dir: Path, study, names: list[str]) -> list[Path]:
    """pareto.png: every COMPLETE trial by its objectives, the Pareto front marked and joined (two objectives;
    each pair of objectives for three or more)."""
    import itertools

    import optuna

    plt = pyplot()
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    front = {t.number for t in study.best_trials}
    if not complete:
        return []
    names = names or [f"objective {i}" for i in range(len(study.directions))]
    pairs = list(itertools.combinations(range(len(names)), 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4.5), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        others = [t for t in complete if t.number not in front]
        best = sorted((t for t in complete if t.number in front), key=lambda t: t.values[i])
        ax.scatter([t.values[i] for t in others], [t.values[j] for t in others], color="tab:gray", label="trial")
        ax.plot([t.values[i] for t in best], [t.values[j] for t in best], "o-", color="tab:red", label="Pareto front")
        for t in best:
            ax.annotate(str(t.number), (t.values[i], t.values[j]), textcoords="offset points", xytext=(4, 4))
        arrows = [("higher" if d == optuna.study.StudyDirection.MAXIMIZE else "lower") for d in study.directions]
        ax.set(xlabel=f"{names[i]} ({arrows[i]} is better)", ylabel=f"{names[j]} ({arrows[j]} is better)",
               title=f"{len(best)} of {len(complete)} trials on the front")
        ax.legend()
    folder = sweep_dir / "report"
    folder.mkdir(exist_ok=True)
    return [save(fig, folder / "pareto.png")]
