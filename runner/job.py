"""The generic runner: data -> encoder + pooling + head -> mode -> loop -> metrics -> saved model -> MLflow.

Nothing here reads a ``DictConfig``: ``runner.run`` hands over a typed :class:`Run`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.contrib.logging import logging_redirect_tqdm

from runner import artifact, batching
from runner.data import Dataset, load_dataset
from runner.errors import RunnerError
from runner.evaluate import METRICS, class_report, classification_metrics, predict
from runner.hardware import make_accelerator
from runner.model import TextModel, load_encoder, load_tokenizer
from runner.modes import Mode
from runner.pooling import Pooling
from runner.schema import Direction, RunConfig
from runner.tracking import Tracker, default_uri
from runner.train import fit

log = logging.getLogger("runner")


@dataclass
class Run:
    """The composed run: typed config plus the components the config chose."""

    cfg: RunConfig
    make_pooling: Callable[[], Pooling]  # a fresh (possibly trainable) pooling per model built
    mode: Mode
    choices: dict[str, str]  # config group -> chosen option, for tags and run names
    config_yaml: str


@dataclass
class FitResult:
    model: TextModel
    metrics: dict[str, float]
    reports: dict[str, Any]
    best_step: int
    steps: int
    best: float | None = None  # best value of the monitored val/* metric during training


def execute(run: Run) -> float:
    """Run one job and return the objective (``cfg.objective.metric``) of the final model."""
    cfg = run.cfg
    quiet_libraries()
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    accelerator = make_accelerator(cfg.hardware.device, cfg.precision.dtype, cfg.train.grad_accum)
    out = Path(cfg.output_dir)
    tracker = Tracker(cfg.tracking.uri or default_uri(), cfg.tracking.experiment,
                      cfg.tracking.enabled and accelerator.is_main_process)
    name = cfg.tracking.run_name or "-".join(run.choices.get(g, "?") for g in ("model", "mode", "pooling", "data"))
    tracker.start(name, tags={**run.choices, "output_dir": str(out)})
    try:
        tracker.log_params(dataclasses.asdict(cfg))
        data = load_dataset(cfg.data)
        check_objective(cfg, data)
        log.info("data: %d train, %d validation%s, %d labels", len(data.train), len(data.validation),
                 f", {len(data.test)} test" if data.test else "", len(data.label_names))
        tokenizer = load_tokenizer(cfg.model)
        result = fit_and_evaluate(run, data, tokenizer, accelerator, tracker)
        objective = result.metrics[cfg.objective.metric]
        if accelerator.is_main_process:
            write_outputs(run, data, tokenizer, result, out, tracker)
        log.info("objective %s = %.4f", cfg.objective.metric, objective)
        tracker.set_tags({"objective": cfg.objective.metric})
        tracker.finish("FINISHED")
        return objective
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise


def fit_and_evaluate(run: Run, data: Dataset, tokenizer, accelerator, tracker: Tracker) -> FitResult:
    """Build a fresh model, train it on ``data.train`` and evaluate on validation (and test)."""
    cfg, train_cfg = run.cfg, run.cfg.train
    encode = lambda split: batching.Encoded(  # noqa: E731
        tokenizer, split.texts, split.labels, cfg.model.max_length, cfg.model.text_prefix
    )
    eval_bs = train_cfg.eval_batch_size or 2 * train_cfg.batch_size
    train_loader = batching.make_loader(encode(data.train), tokenizer, train_cfg.batch_size, train=True,
                                        seed=train_cfg.seed, group_by_length=train_cfg.group_by_length,
                                        workers=cfg.hardware.num_workers)
    eval_loaders = {"val": batching.make_loader(encode(data.validation), tokenizer, eval_bs, train=False)}
    if data.test is not None:
        eval_loaders["test"] = batching.make_loader(encode(data.test), tokenizer, eval_bs, train=False)

    model = build_model(run, len(tokenizer), len(data.label_names))
    optimizer = torch.optim.AdamW(param_groups(model, train_cfg.lr, train_cfg.head_lr, train_cfg.weight_decay))
    total = train_cfg.max_steps if train_cfg.max_steps > 0 else train_cfg.epochs * math.ceil(len(train_loader) / train_cfg.grad_accum)
    scheduler = make_scheduler(train_cfg.scheduler.value, optimizer, total, train_cfg.warmup_ratio)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loaders = {k: accelerator.prepare(v) for k, v in eval_loaders.items()}

    def evaluate(step: int, splits=("val",)) -> dict[str, float]:
        metrics = {}
        for split in splits:
            logits, labels = predict(model, eval_loaders[split], accelerator)
            metrics.update(classification_metrics(logits, labels, split))
        tracker.log_metrics(metrics, step)
        log.info("step %d: %s", step, format_metrics(metrics))
        return metrics

    evaluate(0, tuple(eval_loaders))  # the untrained model: the gain from training is visible in MLflow
    # Model selection looks at validation only: a test/* objective is monitored through its val/* twin.
    monitor = "val/" + cfg.objective.metric.split("/", 1)[1]
    with logging_redirect_tqdm():  # log lines print above the progress bar, not through it
        state = fit(model, ce_loss, train_loader, optimizer, scheduler, accelerator, train_cfg, evaluate, monitor,
                    cfg.objective.direction == Direction.maximize, tracker.log_metrics)
    metrics, reports = {}, {}
    for split, loader in eval_loaders.items():  # final model (the best one, with early stopping)
        logits, labels = predict(model, loader, accelerator)
        metrics.update(classification_metrics(logits, labels, split))
        reports[split] = class_report(logits, labels, data.label_names)
    tracker.log_metrics(metrics, state.step)
    return FitResult(accelerator.unwrap_model(model), metrics, reports, state.best_step, state.step, state.best)


def ce_loss(model: TextModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch), batch["labels"])


def build_model(run: Run, vocab_size: int, num_labels: int) -> TextModel:
    encoder = load_encoder(run.cfg.model, vocab_size)
    if run.cfg.train.gradient_checkpointing:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    encoder = run.mode.apply(encoder)
    return TextModel(encoder, run.make_pooling(), num_labels, run.cfg.train.head_dropout, run.mode.frozen_encoder)


def param_groups(model: TextModel, lr: float, head_lr: float | None, weight_decay: float) -> list[dict]:
    """Encoder and head groups; no weight decay on biases and norm weights (every 1-D tensor)."""
    groups = {
        (part, decay): {"params": [], "lr": lr if part == "encoder" else (head_lr or lr),
                        "weight_decay": weight_decay if decay else 0.0}
        for part in ("encoder", "head") for decay in (True, False)
    }
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[("encoder" if name.startswith("encoder.") else "head", p.ndim >= 2)]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def make_scheduler(name: str, optimizer, total_steps: int, warmup_ratio: float):
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def check_objective(cfg: RunConfig, data: Dataset) -> None:
    splits = ["val"] + (["test"] if data.test is not None else [])
    known = [f"{s}/{m}" for s in splits for m in METRICS]
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


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def write_outputs(run: Run, data: Dataset, tokenizer, result: FitResult, out: Path, tracker: Tracker) -> None:
    """metrics.json, report.json, labels.json, config.yaml and model/ in the run folder; copies in MLflow."""
    cfg = run.cfg
    out.mkdir(parents=True, exist_ok=True)
    summary = {"objective": {"metric": cfg.objective.metric, "value": result.metrics[cfg.objective.metric]},
               "metrics": result.metrics, "steps": result.steps, "best_step": result.best_step}
    files = {
        "metrics.json": json.dumps(summary, indent=2),
        "report.json": json.dumps(result.reports, indent=2),
        "labels.json": json.dumps(data.label_names),
        "config.yaml": run.config_yaml,
    }
    for filename, text in files.items():
        (out / filename).write_text(text)
        tracker.log_artifact(out / filename)
    if cfg.save_model:
        base = None if cfg.model.random_init else cfg.model.name_or_path
        folder = artifact.save_model(out / "model", result.model, tokenizer, data.label_names, base,
                                     cfg.model.text_prefix, cfg.model.max_length, run.config_yaml)
        log.info("model saved to %s", folder)

