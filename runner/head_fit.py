"""The training loop for a head on vectors held in memory: a frozen encoder's cached features pooled once
(mode=head_only), or embeddings given with the data.

Such a step is microseconds of arithmetic (a 384 x 6 linear layer on 32 rows), so what :func:`runner.train.fit`
adds around it (a DataLoader per batch, accelerate's wrappers, a checkpoint per epoch) is nearly all of its
cost: measured on TREC with MiniLM features, 2.9 ms a step, ~40 s for a 5-fold job, most of a search trial.
Here batches are rows indexed from the tensors, and the optimizer, scheduler and clipping are called
directly: the same operations in the same order as ``fit`` (same batches from the same seeded sampler, same
dropout masks, same updates, the same evaluations, logging and early stopping), so the weights are the ones
``fit`` would give (tests/test_head_fit.py compares them), in a fraction of the time.

Checkpoints are written as ``fit`` writes them (every ``train.checkpoint_every`` steps, on a signal), and a
resumed run continues from them the same way; but an epoch end, seconds of work here, is checkpointed only
when the last checkpoint is older than ``EPOCH_CHECKPOINT_SECONDS``: twenty epochs of a head would otherwise
write twenty checkpoints in a few seconds. Several processes or gradient accumulation use ``fit``.
"""

from __future__ import annotations

import time

import torch

from runner import checkpoint
from runner.signals import STOP, Interrupted
from runner.train import (
    Events,
    LoopParts,
    TrainState,
    checkpoint_due,
    early_stopping,
    log_train,
    logs_at,
    total_steps,
)

EPOCH_CHECKPOINT_SECONDS = 30.0


def applies(parts: LoopParts, cfg) -> bool:
    """Whether this training is a head on in-memory vectors that :func:`fit_vectors` can run."""
    from runner.batching import FrozenSplit

    return (isinstance(getattr(parts.loader, "dataset", None), FrozenSplit) and parts.accelerator.num_processes == 1
            and cfg.grad_accum == 1)


def fit_vectors(parts: LoopParts, state: TrainState, cfg, events: Events, monitor: str, maximize: bool) -> TrainState:
    """:func:`runner.train.fit` for rows of in-memory tensors: no loader, fewer epoch-end checkpoints."""
    model, data, sampler = parts.model, parts.loader.dataset, parts.sampler
    optimizer = getattr(parts.optimizer, "optimizer", parts.optimizer)  # the torch objects under accelerate's wrappers
    scheduler = getattr(parts.scheduler, "scheduler", parts.scheduler)
    device = parts.accelerator.device
    total = total_steps(cfg, len(sampler))
    eval_every = cfg.eval_every or len(sampler)
    trained = [p for p in model.parameters() if p.requires_grad]
    running, tic = torch.tensor(state.loss_sum, device=device), time.perf_counter()
    saved = time.monotonic()
    model.train()
    with STOP.deferred():
        while state.step < total and not state.stop:
            sampler.start(state.epoch, state.batch)
            for index in sampler:
                batch = to_device(data.collate(index), device)
                loss = parts.loss_fn(model, batch)
                loss.backward()
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                running += checkpoint.nan_point(loss.detach(), state.step + 1, 0)
                state.step, state.loss_steps = state.step + 1, state.loss_steps + 1
                state.batch, state.samples = state.batch + 1, state.samples + len(index)
                epoch_end = state.batch >= len(sampler)
                if epoch_end:
                    state.epoch, state.batch = state.epoch + 1, 0
                checkpoint.crash_point("step", state.step)  # through the module: the resume tests replace it
                if logs_at(state.step, cfg, eval_every, total):
                    log_train(state, running, parts, time.perf_counter() - tic, events.log)
                    tic = time.perf_counter()
                if state.step % eval_every == 0 or state.step == total:
                    early_stopping(state, model, events.evaluate(state.step)[monitor], cfg, maximize)
                if checkpoint_due(state, cfg, total, epoch_end and time.monotonic() - saved > EPOCH_CHECKPOINT_SECONDS):
                    state.loss_sum = running.item()
                    where, saved = events.checkpoint(state), time.monotonic()
                    if STOP.received:
                        STOP.announce()
                        raise Interrupted(STOP.received, f"stopped by {STOP.name()} at step {state.step}; checkpoint "
                                          f"{where}")
                if state.step >= total or state.stop:
                    break
    if state.best_weights is not None:  # early stopping: restore the best evaluation's weights
        model.load_state_dict(state.best_weights, strict=False)
    return state


def to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    from accelerate.utils import send_to_device

    return send_to_device(batch, device)

