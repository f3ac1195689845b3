"""One model, start to finish: build it, train it on ``data.train``, evaluate on validation (and test).

Single runs call this once; k-fold calls it once per fold (``runner.cv``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.contrib.logging import logging_redirect_tqdm

from runner import batching
from runner.data import Dataset
from runner.evaluate import class_report, classification_metrics, predict
from runner.model import TextModel, load_encoder
from runner.schema import Direction
from runner.tracking import Tracker
from runner.train import fit

log = logging.getLogger("runner")


@dataclass
class FitResult:
    model: TextModel
    metrics: dict[str, float]
    reports: dict[str, Any]
    best_step: int
    steps: int
    best: float | None = None  # best value of the monitored val/* metric during training


def fit_and_evaluate(run, data: Dataset, tokenizer, accelerator, tracker: Tracker) -> FitResult:
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


def build_model(run, vocab_size: int, num_labels: int) -> TextModel:
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


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())


