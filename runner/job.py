"""The generic runner: data -> model(s) -> metrics -> saved model -> MLflow, for one job.

A job is a single fit, or a k-fold cross-validation (``cv.folds``) whose folds are nested MLflow runs.
Nothing here reads a ``DictConfig``: ``runner.run`` hands over a typed :class:`Run`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from runner import artifact
from runner.data import Dataset, load_dataset
from runner.errors import RunnerError
from runner.experiment import FitResult, fit_and_evaluate
from runner.hardware import make_accelerator
from runner.losses import Loss
from runner.model import load_tokenizer
from runner.modes import Mode
from runner.pooling import Pooling
from runner.schema import DataType, RunConfig
from runner.tasks import Task
from runner.tracking import Tracker, default_uri

log = logging.getLogger("runner")


@dataclass
class Run:
    """The composed run: typed config plus the components the config chose."""

    cfg: RunConfig
    make_pooling: Callable[[], Pooling]  # a fresh (possibly trainable) pooling per model built
    mode: Mode
    choices: dict[str, str]  # config group -> chosen option, for tags and run names
    config_yaml: str
    task: Task | None = None  # what is learned: batch layout, head or not, metrics (runner.tasks)
    make_loss: Callable[[], Loss] | None = None  # the configured loss, or the task's default
    parent_run_id: str | None = None  # the sweep's MLflow run, when this job is part of one
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (sweep id, job number, overrides)


def execute(run: Run) -> float:
    """Run one job and return the objective (``cfg.objective.metric``, or its fold mean under k-fold)."""
    from runner import cv

    cfg = run.cfg
    quiet_libraries()
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    accelerator = make_accelerator(cfg.hardware.device, cfg.precision.dtype, cfg.train.grad_accum)
    out = Path(cfg.output_dir)
    tracker = Tracker(cfg.tracking.uri or default_uri(), cfg.tracking.experiment,
                      cfg.tracking.enabled and accelerator.is_main_process)
    name = cfg.tracking.run_name or "-".join(run.choices.get(g, "?") for g in ("model", "mode", "pooling", "data"))
    tracker.start(name, tags={**run.choices, **run.tags, "output_dir": str(out), "objective": cfg.objective.metric},
                  parent_id=run.parent_run_id)
    try:
        tracker.log_params(dataclasses.asdict(cfg))
        k_fold = cfg.cv.folds > 1
        data = load_dataset(cfg.data, run.task.target, need_validation=not k_fold)
        check_objective(run, data)
        log.info("data: %d train%s%s, %d labels", len(data.train),
                 f", {len(data.validation)} validation" if data.validation and not k_fold else "",
                 f", {len(data.test)} test" if data.test else "", len(data.label_names))
        tokenizer = load_tokenizer(cfg.model)
        out.mkdir(parents=True, exist_ok=True)
        if k_fold:
            summary = cv.cross_validate(run, data, tokenizer, accelerator, tracker, out)
        else:
            result = fit_and_evaluate(run, data, tokenizer, accelerator, tracker)
            summary = single_summary(run, result)
            if accelerator.is_main_process and cfg.save_model:
                save(run, result, tokenizer, data, out / "model")
        if accelerator.is_main_process:
            write_outputs(run, data, summary, out, tracker)
        objective = summary["objective"]["value"]
        log.info("objective %s = %.4f", summary["objective"]["metric"], objective)
        tracker.finish("FINISHED")
        return objective
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise


def single_summary(run: Run, result: FitResult) -> dict:
    metric = run.cfg.objective.metric
    return {"objective": {"metric": metric, "value": result.metrics[metric]}, "metrics": result.metrics,
            "reports": result.reports, "steps": result.steps, "best_step": result.best_step}


def save(run: Run, result: FitResult, tokenizer, data: Dataset, folder: Path) -> None:
    cfg = run.cfg
    base = None if cfg.model.random_init else cfg.model.name_or_path
    artifact.save_model(folder, result.model, tokenizer, data.label_names, base, cfg.model.text_prefix,
                        cfg.model.max_length, run.config_yaml, task=type(run.task).__name__,
                        cross_encoder=run.task.joint and cfg.data.type == DataType.pair)
    log.info("model saved to %s", folder)


def check_objective(run: Run, data: Dataset) -> None:
    cfg = run.cfg
    splits = ["val"] + (["test"] if data.test is not None else [])
    known = [f"{s}/{m}" for s in splits for m in run.task.metric_names]
    if cfg.objective.metric not in known:
        raise RunnerError(f"objective.metric={cfg.objective.metric!r} is not a metric of this run; choose one of {known}")


def quiet_libraries() -> None:
    """No per-file progress bars from transformers: the run's own bar and log lines are the output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def seed_everything(seed: int, deterministic: bool) -> None:
    from accelerate.utils import set_seed

    set_seed(seed, deterministic=deterministic)


def write_outputs(run: Run, data: Dataset, summary: dict, out: Path, tracker: Tracker) -> None:
    """metrics.json, report.json, labels.json and config.yaml in the run folder; copies in MLflow."""
    reports = summary.pop("reports", {})
    files = {
        "metrics.json": json.dumps(summary, indent=2),
        "report.json": json.dumps(reports, indent=2),
        "labels.json": json.dumps(data.label_names),
        "config.yaml": run.config_yaml,
    }
    for filename, text in files.items():
        (out / filename).write_text(text)
        tracker.log_artifact(out / filename)
