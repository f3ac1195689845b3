"""Every fold of a k-fold head_only job trained at once: one stacked linear head, one batched step.

On cached features a step of one fold's head is microseconds of arithmetic under ~0.3 ms of Python
(runner/head_fit.py), so a 5-fold job is 5 x the steps' Python. Here the F heads are one weight tensor
(F, classes, hidden), and each step is every fold's own batch as one batched matrix product:

- fold f's loss depends on its own slice of the weights only, so the gradient of the folds' summed loss is
  each fold's own gradient; clipping is per fold (its own norm); AdamW is elementwise, so one AdamW over
  the stacked tensors is F independent AdamWs with the same schedule;
- each fold draws its batches from its own sampler, seeded as when trained alone, and keeps its own
  evaluations, logs, MLflow run and result.

What differs from training the folds one by one: the dropout masks are drawn for all folds at once (with
``train.head_dropout=0`` the weights are the ones sequential training gives: tests/test_fold_heads.py), and
no checkpoint is written, the whole job being seconds (a resumed job retrains its unfinished folds). Where
this does not apply (see :func:`applies`), folds train one after the other.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from runner import batching, checkpoint
from runner.data import Dataset
from runner.errors import TrainingDiverged
from runner.experiment import (
    FitResult,
    build_model,
    check_finite,
    dataset_of,
    format_metrics,
    make_loss,
    make_scheduler,
)
from runner.features import FrozenFeatures
from runner.losses import LogitLoss
from runner.signals import STOP, Interrupted
from runner.spec import Run
from runner.tracking import Tracker
from runner.train import TrainState, early_stopping, logs_at, total_steps

log = logging.getLogger("runner")


def applies(run: Run, fold_data: dict[int, Dataset], frozen: FrozenFeatures | None, accelerator,
            resumable: bool) -> bool:
    """Whether these folds can train together: a linear head on pooled frozen features with a logits loss,
    one process, no gradient accumulation, no early stopping, nothing to resume, and the same number of
    batches per epoch in every fold (their step schedules are then one)."""
    cfg = run.cfg.train
    if len(fold_data) < 2 or frozen is None or resumable or accelerator.num_processes != 1 or cfg.grad_accum != 1:
        return False
    if run.cfg.distill.teacher or cfg.early_stopping.patience > 0 or not run.task.has_head:
        return False
    if not isinstance(run.make_loss(), LogitLoss) or frozen.pooled(run.make_pooling()) is None:
        return False
    return len({math.ceil(len(d.train) / cfg.batch_size) for d in fold_data.values()}) == 1


class StackedHeads:
    """F linear heads as one (F, C, D) weight and (F, C) bias, initialised from F freshly built models (the
    same random draws, in the same order, as building each fold's model alone)."""

    def __init__(self, models: list) -> None:
        linears = [m.head[1] for m in models]
        self.weight = torch.nn.Parameter(torch.stack([lin.weight.detach() for lin in linears]))
        self.bias = torch.nn.Parameter(torch.stack([lin.bias.detach() for lin in linears]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(F, rows, D) -> (F, rows, C)."""
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    def one(self, f: int, x: torch.Tensor) -> torch.Tensor:
        """Fold f's head on (rows, D)."""
        return torch.addmm(self.bias[f], x, self.weight[f].T)

    def clip(self, max_norm: float) -> None:
        """Each fold's gradient clipped to its own norm, as ``clip_grad_norm_`` clips one model's."""
        norms = (self.weight.grad.pow(2).sum((1, 2)) + self.bias.grad.pow(2).sum(1)).sqrt()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        self.weight.grad.mul_(scale[:, None, None])
        self.bias.grad.mul_(scale[:, None])

    def into(self, f: int, model) -> None:
        with torch.no_grad():
            model.head[1].weight.copy_(self.weight[f])
            model.head[1].bias.copy_(self.bias[f])


def fit_folds(run: Run, fold_data: dict[int, Dataset], tokenizer, accelerator, children: dict[int, Tracker],
              frozen: FrozenFeatures) -> dict[int, FitResult]:
    """Train and evaluate one head per fold, all at once; the same results ``fit_and_evaluate`` gives each."""
    cfg, tc, task = run.cfg, run.cfg.train, run.task
    ids = list(fold_data)
    label_names = next(iter(fold_data.values())).label_names
    encoded = [{name: dataset_of(run, split, tokenizer, frozen)
                for name, split in (("train", d.train), ("val", d.validation), ("test", d.test)) if split}
               for d in fold_data.values()]
    grouped = tc.group_by_length if tc.group_by_length is not None else task.loss_family == "logits"
    samplers = [batching.make_loader(e["train"], tokenizer, tc.batch_size, train=True, seed=tc.seed,
                                     group_by_length=grouped).batch_sampler for e in encoded]
    models = [build_model(run, len(tokenizer), task.num_outputs(label_names), frozen.encoder) for _ in ids]
    losses = [make_loss(run, m, d) for m, d in zip(models, fold_data.values())]
    heads = StackedHeads(models)
    lr = tc.head_lr or tc.lr
    optimizer = torch.optim.AdamW([{"params": [heads.weight], "lr": lr, "weight_decay": tc.weight_decay},
                                   {"params": [heads.bias], "lr": lr, "weight_decay": 0.0}], fused=True)
    per_epoch = len(samplers[0])
    total = total_steps(tc, per_epoch)
    scheduler = make_scheduler(tc.scheduler.value, optimizer, total, tc.warmup_ratio)
    eval_every = tc.eval_every or per_epoch
    monitor = "val/" + cfg.objective.metric.split("/", 1)[1]
    maximize = cfg.objective.direction.value == "maximize"

    vectors = frozen.pooled(run.make_pooling())
    # each fold's training rows (vector row ids) and targets, padded to one (F, n) table indexed per step
    train_rows = torch.nn.utils.rnn.pad_sequence([e["train"].rows[0] for e in encoded], batch_first=True)
    train_labels = torch.nn.utils.rnn.pad_sequence([e["train"].labels for e in encoded], batch_first=True)
    folds = torch.arange(len(ids))[:, None]
    states = [TrainState(sampler_seed=tc.seed) for _ in ids]
    last: list[dict[str, tuple[dict, dict]]] = [{} for _ in ids]

    def evaluate(step: int, splits: tuple[str, ...]) -> None:
        final = step >= total
        with torch.no_grad(), accelerator.autocast():
            for f, fold in enumerate(ids):
                metrics = {}
                for split in splits:
                    data = encoded[f][split]
                    logits = heads.one(f, vectors[data.rows[0]])
                    values, report = task.score([logits.float().numpy()], None if data.labels is None else
                                                data.labels.numpy(), split, label_names, data.text_ids.numpy(),
                                                report=final or split != "val")
                    metrics.update(values)
                    last[f][split] = (values, report)
                children[fold].log_metrics(metrics, step)
                log.info("fold-%d step %d: %s", fold, step, format_metrics(metrics))
                if "val" in splits and monitor in metrics:
                    early_stopping(states[f], None, metrics[monitor], tc, maximize)

    if tc.eval_at_start:
        evaluate(0, tuple(encoded[0].keys() - {"train"}))
    drop = Dropout(tc.head_dropout)
    running, seen, tic, step, window = torch.zeros(len(ids)), 0, time.perf_counter(), 0, 0
    with STOP.deferred():
        while step < total:
            for sampler in samplers:
                sampler.start(step // per_epoch)
            for batch in zip(*samplers):
                sizes = [len(b) for b in batch]
                width = max(sizes)
                positions = torch.tensor([b + [0] * (width - len(b)) for b in batch])  # padded: never in a loss
                x = drop(vectors[train_rows[folds, positions]])
                y = train_labels[folds, positions]  # class ids, scores or multi-label rows
                with accelerator.autocast():
                    logits = heads(x).float()
                fold_loss = torch.stack([fn.compute(logits[f, :n], y[f, :n]) for f, (fn, n) in enumerate(zip(losses, sizes))])
                fold_loss.sum().backward()
                if tc.max_grad_norm > 0:
                    heads.clip(tc.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                running += checkpoint.nan_point(fold_loss.detach(), step + 1, 0)
                step, seen, window = step + 1, seen + sum(sizes), window + 1
                if logs_at(step, tc, eval_every, total):
                    log_losses(running / window, scheduler.get_last_lr()[0],
                               seen / max(time.perf_counter() - tic, 1e-9), step, ids, children)
                    running.zero_()
                    seen, tic, window = 0, time.perf_counter(), 0
                if step % eval_every == 0 or step == total:
                    evaluate(step, ("val",))
                if STOP.received:
                    STOP.announce()
                    raise Interrupted(STOP.received, f"stopped by {STOP.name()} at step {step}; the folds trained "
                                      f"together keep no checkpoint: a resumed job trains them again (seconds)")
                if step >= total:
                    break
    if "test" in encoded[0]:
        evaluate(step, ("test",))
    results = {}
    for f, fold in enumerate(ids):
        heads.into(f, models[f])
        metrics = {k: v for values, _ in last[f].values() for k, v in values.items()}
        check_finite(metrics, models[f], step)
        reports = {split: report for split, (_, report) in last[f].items() if report}
        results[fold] = FitResult(models[f], metrics, reports, states[f].best_step, step, states[f].best)
    return results


class Dropout:
    """Inverted dropout as ``torch.nn.functional.dropout`` computes it (keep with probability 1 - p, scale by
    1 / (1 - p)), its uniforms drawn by NumPy's PCG64: on CPU, torch's generator spends ~10 ns a value, 4x the
    rest of a step of these heads. Seeded from torch's generator, so a seeded job draws the same masks."""

    def __init__(self, p: float) -> None:
        self.p = p
        self.rng = np.random.default_rng(int(torch.randint(2**62, ())))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.p <= 0:
            return x
        if self.p >= 1:
            return torch.zeros_like(x)
        keep = torch.from_numpy(self.rng.random(x.shape, dtype=np.float32) >= self.p)
        return x * keep * (1.0 / (1.0 - self.p))


def log_losses(means: torch.Tensor, lr: float, rate: float, step: int, ids: list[int], children: dict[int, Tracker]) -> None:
    """Each fold's train/loss (mean over the window), lr and samples/s; a non-finite loss stops the job."""
    for fold, value in zip(ids, means.tolist()):
        if not math.isfinite(value):
            raise TrainingDiverged(f"fold-{fold}: loss is {value} at step {step}; lower train.head_lr or use precision=fp32")
        children[fold].log_metrics({"train/loss": value, "train/lr": lr, "train/samples_per_s": rate / len(ids)}, step)

