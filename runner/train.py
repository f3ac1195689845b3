"""The training loop: one screen, no branching on model, pooling, mode or precision.

Everything the loop owns lives in :class:`TrainState`, the object a checkpoint saves and restores: the
step and epoch, the position inside the epoch (batches already consumed, which a resumed run skips),
the loss window since the last log, and the early-stopping state with the best weights. Nothing lives
in locals that a resumed run would lose, so a resumed run continues exactly where the killed one was.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from runner.checkpoint import crash_point, nan_point
from runner.errors import TrainingDiverged
from runner.schema import TrainConfig
from runner.signals import STOP, Interrupted


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs done; the sampler's order is a function of (sampler_seed, epoch)
    batch: int = 0  # micro-batches of the current epoch already consumed (a resumed run skips them)
    sampler_seed: int = 0
    loss_sum: float = 0.0  # sum of the per-step losses since the last train/loss log
    loss_steps: int = 0  # optimizer steps in that window
    samples: int = 0  # examples seen since the last log (train/samples_per_s)
    best: float | None = None  # best monitored value seen at an evaluation
    best_step: int = 0
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    stop: bool = False  # early stopping asked to stop
    best_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)


@dataclass
class LoopParts:
    """What the loop drives: prepared model, loss, loader (and its batch sampler), optimizer, scheduler."""

    model: Any
    loss_fn: Any
    loader: Any
    sampler: Any  # runner.batching.LengthGroupedBatches: positioned by (epoch, batch) before each pass
    optimizer: Any
    scheduler: Any
    accelerator: Any


@dataclass
class Events:
    """What happens around the loop: logging, evaluation (returns metrics) and checkpointing."""

    log: Callable[[dict[str, float], int], None]
    evaluate: Callable[[int], dict[str, float]]
    checkpoint: Callable[[TrainState], Any]


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    return cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * math.ceil(batches_per_epoch / cfg.grad_accum)


def logs_at(step: int, cfg: TrainConfig, eval_every: int, total: int) -> bool:
    """Whether train/loss is logged after ``step``: every ``train.log_every`` steps (0: at each evaluation)."""
    return step % (cfg.log_every or eval_every) == 0 or step == total


def fit(parts: LoopParts, state: TrainState, cfg: TrainConfig, events: Events, monitor: str, maximize: bool) -> TrainState:
    """Train from ``state`` until ``cfg.max_steps`` or ``cfg.epochs``; evaluate, early-stop, checkpoint."""
    model, loader, accelerator = parts.model, parts.loader, parts.accelerator
    total = total_steps(cfg, len(loader))
    eval_every = cfg.eval_every or math.ceil(len(loader) / cfg.grad_accum)
    bar = tqdm(total=total, initial=state.step, disable=not (cfg.progress and accelerator.is_main_process), unit="step")
    model.train()
    running, tic = torch.tensor(state.loss_sum, device=accelerator.device), time.perf_counter()
    trained = [p for p in model.parameters() if p.requires_grad]  # clipping walks these only (not a frozen encoder)
    with STOP.deferred():  # a signal now ends the step, checkpoints and stops (runner/signals.py)
        while state.step < total and not state.stop:
            parts.sampler.start(state.epoch, state.batch)
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = parts.loss_fn(model, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trained, cfg.max_grad_norm)
                    parts.optimizer.step()
                    parts.scheduler.step()
                    parts.optimizer.zero_grad(set_to_none=True)
                running += nan_point(loss.detach(), state.step + 1, accelerator.process_index) / cfg.grad_accum
                state.batch, state.samples = state.batch + 1, state.samples + len(batch["index"])
                if not accelerator.sync_gradients:
                    continue
                state.step, state.loss_steps = state.step + 1, state.loss_steps + 1
                epoch_end = state.batch >= len(loader)
                if epoch_end:
                    state.epoch, state.batch = state.epoch + 1, 0
                crash_point("step", state.step)
                if logs_at(state.step, cfg, eval_every, total):
                    bar.set_postfix(loss=f"{log_train(state, running, parts, time.perf_counter() - tic, events.log):.4f}")
                    tic = time.perf_counter()
                if state.step % eval_every == 0 or state.step == total:
                    early_stopping(state, model, events.evaluate(state.step)[monitor], cfg, maximize)
                if checkpoint_due(state, cfg, total, epoch_end):
                    state.loss_sum = running.item()  # a host sync, only when checkpointing
                    where = events.checkpoint(state)
                    if STOP.received:
                        STOP.announce()
                        raise Interrupted(STOP.received, f"stopped by {STOP.name()} at step {state.step}; checkpoint "
                                          f"{where}")
                bar.update(1)
                if state.step >= total or state.stop:
                    break
    bar.close()
    if state.best_weights is not None:  # early stopping: restore the best evaluation's weights
        model.load_state_dict(state.best_weights, strict=False)
    return state


def checkpoint_due(state: TrainState, cfg: TrainConfig, total: int, epoch_end: bool) -> bool:
    """Whether to checkpoint after this step: on a signal, or when scheduled (every ``train.checkpoint_every``
    steps, or at an epoch end the loop checkpoints) and training goes on. The last step's checkpoint would be
    deleted a moment later, as the run finishes: it costs a fine-tuned encoder's weights and optimizer state on
    disk (~1 s for MiniLM) for nothing, unless ``train.keep_checkpoints_after_run`` keeps it."""
    scheduled = epoch_end or bool(cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0)
    finishing = state.step >= total or state.stop
    return bool(STOP.received) or (scheduled and (not finishing or cfg.keep_checkpoints_after_run))


def log_train(state: TrainState, running: torch.Tensor, parts: LoopParts, seconds: float, log) -> float:
    """train/loss (mean over the window), lr, samples/s and any extra loss terms; resets the window;
    returns the mean loss."""
    # the mean over all processes (.item() syncs: only at log steps): a NaN on any process is a NaN on
    # every process, so all of them stop here, at the same step, with the same message
    accelerator = parts.accelerator
    mean_loss = accelerator.reduce(running, "mean").item() / state.loss_steps
    if not math.isfinite(mean_loss):
        raise TrainingDiverged(f"loss is {mean_loss} at step {state.step}; lower train.lr or use precision=fp32")
    lr = parts.scheduler.get_last_lr()[0]
    extra = {k: float(v) for k, v in getattr(parts.loss_fn, "terms", {}).items()}  # e.g. train/distill
    log({"train/loss": mean_loss, "train/lr": lr, "train/samples_per_s": state.samples * accelerator.num_processes / max(seconds, 1e-9), **extra},
        state.step)
    running.zero_()
    state.loss_sum, state.loss_steps, state.samples = 0.0, 0, 0
    return mean_loss


def early_stopping(state: TrainState, model, value: float, cfg: TrainConfig, maximize: bool) -> None:
    """Track the best objective; keep a copy of its trainable weights; stop after ``patience`` bad evals."""
    gain = (value - state.best if maximize else state.best - value) if state.best is not None else math.inf
    if gain > cfg.early_stopping.min_delta:
        state.best, state.best_step, state.bad_evals = value, state.step, 0
        if cfg.early_stopping.patience > 0:  # only trainable weights change, so only they are copied
            state.best_weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    else:
        state.bad_evals += 1
        state.stop = 0 < cfg.early_stopping.patience <= state.bad_evals
