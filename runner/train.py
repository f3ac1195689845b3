"""The training loop: one screen, no branching on model, pooling, mode or precision.

Everything the loop owns (step, epoch, early-stopping state, best weights) lives in ``TrainState``,
the one object a checkpoint needs to save and restore.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from runner.errors import TrainingDiverged
from runner.schema import TrainConfig


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    best: float | None = None  # best objective value seen at an evaluation
    best_step: int = 0
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    best_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    stop: bool = False


def fit(
    model, loss_fn, loader, optimizer, scheduler, accelerator, cfg: TrainConfig,
    evaluate: Callable[[int], dict[str, float]], objective: str, maximize: bool,
    log: Callable[[dict[str, float], int], None],
) -> TrainState:
    """Train until ``cfg.max_steps`` or ``cfg.epochs``; evaluate, early-stop and keep the best weights."""
    state = TrainState()
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    eval_every = cfg.eval_every or steps_per_epoch
    bar = tqdm(total=total, disable=not (cfg.progress and accelerator.is_main_process), unit="step")
    model.train()
    running, window, seen, tic = torch.zeros((), device=accelerator.device), 0, 0, time.perf_counter()
    while state.step < total and not state.stop:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            running += loss.detach() / cfg.grad_accum
            seen += len(batch["index"])
            if not accelerator.sync_gradients:
                continue
            state.step, window = state.step + 1, window + 1
            if state.step % cfg.log_every == 0 or state.step == total:
                mean_loss, window = running.item() / window, 0  # .item() syncs: only at log steps
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(f"loss is {mean_loss} at step {state.step}; lower train.lr or use precision=fp32")
                rate = seen / (time.perf_counter() - tic)
                extra = {k: float(v) for k, v in getattr(loss_fn, "terms", {}).items()}  # e.g. train/distill
                log({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0], "train/samples_per_s": rate,
                     **extra}, state.step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", samples_s=f"{rate:.1f}")
                running.zero_()
            bar.update(1)
            if state.step % eval_every == 0 or state.step == total:
                early_stopping(state, model, evaluate(state.step)[objective], cfg, maximize)
            if state.step >= total or state.stop:
                break
        state.epoch += 1
    bar.close()
    if state.best_weights is not None:  # early stopping: restore the best evaluation's weights
        model.load_state_dict(state.best_weights, strict=False)
    return state


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
