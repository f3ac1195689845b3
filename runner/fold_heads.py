"""Every fold of a k-fold head_only job trained at once: one stacked linear head, one batched step.

On cached features a step of one fold's head is microseconds of arithmetic under ~0.3 ms of Python
(runner/head_fit.py), so a 5-fold job is 5 x the steps' Python. Here the F heads are one weight tensor
(F, classes, hidden), and each step is every fold's own batch as one batched matrix product:

- fold f's loss depends on its own slice of the weights only, so the gradient of the folds' summed loss is
  each fold's own gradient; clipping is per fold (its own norm); AdamW is elementwise, so one AdamW over
  the stacked tensors is F independent AdamWs with the same schedule;
- each fold draws its batches from its own sampler, seeded as when trained alone, and keeps its own
  evaluations, logs, MLflow run and result.

What differs from training the folds one by one: the dropout masks are drawn for all folds at once, at a rate
within 8e-6 of ``train.head_dropout`` (:class:`Dropout`; with
``train.head_dropout=0`` and ``precision=fp32`` the weights are the ones sequential training gives:
tests/test_fold_heads.py); the heads compute in float32 on the CPU, where the cached vectors are, whatever
``precision`` (the encoder's features were computed in it; a bf16 autocast of a 384 x 6 product costs more
than it computes); and no checkpoint is written, the whole job being seconds (a resumed job retrains its
unfinished folds). Where
this does not apply (see :func:`applies`), folds train one after the other.
"""

from __future__ import annotations

import logging
import math

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
from runner.losses import CrossEntropy, LogitLoss
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

    def backward(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        """The weights' gradients from the logits' (F, rows, C): a linear layer's backward, as two products."""
        self.weight.grad = torch.bmm(grad.transpose(1, 2), x)
        self.bias.grad = grad.sum(1)

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
    tc, job = run.cfg.train, FoldTraining(run, fold_data, tokenizer, frozen, children)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # microsecond operations: a second thread costs more to wake than it computes
    try:
        if tc.eval_at_start:
            job.evaluate(0, tuple(split for split in ("val", "test") if split in job.encoded[0]))
        with STOP.deferred():
            while job.step < job.total:
                positions, sizes = job.epoch_batches(job.step // job.per_epoch)
                for where, size in zip(positions, sizes):
                    job.train_step(where, size)
                    if logs_at(job.step, tc, job.eval_every, job.total):
                        job.log_losses()
                    if job.step % job.eval_every == 0 or job.step == job.total:
                        job.evaluate(job.step, ("val",))
                    if STOP.received:
                        STOP.announce()
                        raise Interrupted(STOP.received, f"stopped by {STOP.name()} at step {job.step}; the folds "
                                          f"trained together keep no checkpoint: a resumed job trains them again")
                    if job.step >= job.total:
                        break
        if "test" in job.encoded[0]:
            job.evaluate(job.step, ("test",))
    finally:
        torch.set_num_threads(threads)
    return job.results()


class FoldTraining:
    """What :func:`fit_folds` drives: the folds' rows, samplers, losses, stacked heads and optimizer, a step,
    an evaluation, the loss log and the results."""

    def __init__(self, run: Run, fold_data: dict[int, Dataset], tokenizer, frozen: FrozenFeatures,
                 children: dict[int, Tracker]) -> None:
        cfg, tc, task = run.cfg, run.cfg.train, run.task
        self.run, self.tc, self.task, self.children = run, tc, task, children
        self.ids = list(fold_data)
        self.label_names = next(iter(fold_data.values())).label_names
        self.encoded = [{name: dataset_of(run, split, tokenizer, frozen)
                         for name, split in (("train", d.train), ("val", d.validation), ("test", d.test)) if split}
                        for d in fold_data.values()]
        grouped = tc.group_by_length if tc.group_by_length is not None else task.loss_family == "logits"
        self.samplers = [batching.make_loader(e["train"], tokenizer, tc.batch_size, train=True, seed=tc.seed,
                                              group_by_length=grouped).batch_sampler for e in self.encoded]
        self.models = [build_model(run, len(tokenizer), task.num_outputs(self.label_names), frozen.encoder)
                       for _ in self.ids]
        self.losses = [make_loss(run, m, d) for m, d in zip(self.models, fold_data.values())]
        self.heads = StackedHeads(self.models)
        lr = tc.head_lr or tc.lr
        self.optimizer = torch.optim.AdamW([{"params": [self.heads.weight], "lr": lr, "weight_decay": tc.weight_decay},
                                            {"params": [self.heads.bias], "lr": lr, "weight_decay": 0.0}], fused=True)
        self.per_epoch = len(self.samplers[0])
        self.total = total_steps(tc, self.per_epoch)
        # the schedule's factor for every step, computed once; the optimizer is left without the scheduler's
        # wrapper around its step (a LambdaLR step and that wrapper are ~0.1 ms of Python, a step here ~0.5)
        shape = make_scheduler(tc.scheduler.value, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                               self.total, tc.warmup_ratio).lr_lambdas[0]
        self.rate = [shape(s) for s in range(self.total + 1)]
        self.bases = [lr, lr]
        for group in self.optimizer.param_groups:
            group["lr"] = lr * self.rate[0]
        self.eval_every = tc.eval_every or self.per_epoch
        self.monitor = "val/" + cfg.objective.metric.split("/", 1)[1]
        self.maximize = cfg.objective.direction.value == "maximize"
        self.vectors = frozen.pooled(run.make_pooling())
        # each fold's training rows (vector row ids) and targets, padded to one (F, n) table indexed per step
        self.rows = torch.nn.utils.rnn.pad_sequence([e["train"].rows[0] for e in self.encoded], batch_first=True)
        self.labels = torch.nn.utils.rnn.pad_sequence([e["train"].labels for e in self.encoded], batch_first=True)
        self.folds = torch.arange(len(self.ids))[:, None]
        self.dropout = Dropout(tc.head_dropout)
        self.states = [TrainState(sampler_seed=tc.seed) for _ in self.ids]
        self.last: list[dict[str, tuple[dict, dict]]] = [{} for _ in self.ids]
        self.step, self.window, self.running = 0, 0, torch.zeros(len(self.ids))

    def epoch_batches(self, epoch: int) -> tuple[torch.Tensor, list[list[int]]]:
        """Every step's batch of every fold in this epoch, (steps, F, batch) positions in each fold's training rows
        (a short last batch padded with position 0, which no loss sees), and each fold's real batch sizes."""
        per_fold = []
        for sampler in self.samplers:
            sampler.start(epoch)
            per_fold.append(list(sampler))
        width = self.tc.batch_size
        positions = np.zeros((self.per_epoch, len(self.ids), width), dtype=np.int64)
        sizes = [[len(fold[i]) for fold in per_fold] for i in range(self.per_epoch)]
        for f, batches in enumerate(per_fold):
            for i, batch in enumerate(batches):
                positions[i, f, : len(batch)] = batch
        return torch.from_numpy(positions), sizes

    def train_step(self, positions: torch.Tensor, sizes: list[int]) -> None:
        """One optimizer step of every fold, on each fold's own batch: (F, batch) positions in its training rows."""
        width = max(sizes)
        positions = positions[:, :width]
        # index_select and gather: a third of the time of the same rows by advanced indexing (~25 us vs ~75)
        ids = torch.gather(self.rows, 1, positions).view(-1)
        x = self.dropout(torch.index_select(self.vectors, 0, ids).view(*positions.shape, -1))
        # class ids or scores (F, n); multi-label rows (F, n, L)
        y = torch.gather(self.labels, 1, positions) if self.labels.ndim == 2 else self.labels[self.folds, positions]
        with torch.no_grad():
            logits = self.heads(x)
        fold_loss, grad = gradient(self.losses, logits, y, sizes)
        self.heads.backward(x, grad)
        if self.tc.max_grad_norm > 0:
            self.heads.clip(self.tc.max_grad_norm)
        self.optimizer.step()
        for group, base in zip(self.optimizer.param_groups, self.bases):  # the scheduler's rate, without its wrappers
            group["lr"] = base * self.rate[self.step + 1]
        self.optimizer.zero_grad(set_to_none=True)
        self.running += checkpoint.nan_point(fold_loss, self.step + 1, 0)
        self.step, self.window = self.step + 1, self.window + 1

    def log_losses(self) -> None:
        """Each fold's train/loss (mean over the window) and lr; a non-finite loss stops the job. (No
        train/samples_per_s: the folds share their steps, a rate per fold would be a fifth of one number.)"""
        for fold, value in zip(self.ids, (self.running / self.window).tolist()):
            if not math.isfinite(value):
                raise TrainingDiverged(f"fold-{fold}: loss is {value} at step {self.step}; lower train.head_lr or "
                                       f"use precision=fp32")
            self.children[fold].log_metrics({"train/loss": value, "train/lr": self.optimizer.param_groups[0]["lr"]},
                                            self.step)
        self.running.zero_()
        self.window = 0

    @torch.no_grad()
    def evaluate(self, step: int, splits: tuple[str, ...]) -> None:
        final = step >= self.total
        for f, fold in enumerate(self.ids):
            metrics = {}
            for split in splits:
                data = self.encoded[f][split]
                logits = self.heads.one(f, self.vectors[data.rows[0]])
                values, report = self.task.score([logits.numpy()], None if data.labels is None else data.labels.numpy(),
                                                 split, self.label_names, data.text_ids.numpy(),
                                                 report=final)
                metrics.update(values)
                self.last[f][split] = (values, report)
            self.children[fold].log_metrics(metrics, step)
            log.info("fold-%d step %d: %s", fold, step, format_metrics(metrics))
            if "val" in splits and self.monitor in metrics:
                early_stopping(self.states[f], None, metrics[self.monitor], self.tc, self.maximize)

    def results(self) -> dict[int, FitResult]:
        out = {}
        for f, fold in enumerate(self.ids):
            self.heads.into(f, self.models[f])
            metrics = {k: v for values, _ in self.last[f].values() for k, v in values.items()}
            check_finite(metrics, self.models[f], self.step)
            reports = {split: report for split, (_, report) in self.last[f].items() if report}
            out[fold] = FitResult(self.models[f], metrics, reports, self.states[f].best_step, self.step,
                                  self.states[f].best)
        return out


def gradient(losses: list, logits: torch.Tensor, labels: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each fold's loss on its own rows (padding excluded) and the gradient of their sum with respect to the
    logits: in closed form for plain softmax cross-entropy (the classification default; ~0.1 ms where autograd
    takes ~0.3), through autograd on the loss alone for any other logits loss."""
    if all(type(fn) is CrossEntropy and fn.weight is None and fn.label_smoothing == 0 for fn in losses):
        return cross_entropy_gradient(logits, labels, sizes)
    logits = logits.detach().requires_grad_()
    fold_loss = torch.stack([fn.compute(logits[f, :n], labels[f, :n]) for f, (fn, n) in enumerate(zip(losses, sizes))])
    (grad,) = torch.autograd.grad(fold_loss.sum(), logits)
    return fold_loss.detach(), grad


def cross_entropy_gradient(logits: torch.Tensor, labels: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean softmax cross-entropy per fold and its gradient, ``(softmax - one_hot) / rows``, for (F, B, C) logits
    whose fold f has ``sizes[f]`` real rows (the rest padding: no loss, no gradient)."""
    folds, width, _ = logits.shape
    rows = torch.tensor(sizes, dtype=logits.dtype)
    log_p = logits.log_softmax(-1)
    picked = log_p.gather(2, labels[..., None]).squeeze(-1)
    grad = log_p.exp_().scatter_add_(2, labels[..., None], torch.full((folds, width, 1), -1.0, dtype=logits.dtype))
    if min(sizes) < width:
        real = (torch.arange(width) < rows[:, None]).to(logits.dtype)
        picked, grad = picked * real, grad * real[..., None]
    return -picked.sum(1) / rows, grad / rows[:, None, None]


class Dropout:
    """Inverted dropout: each value kept with probability 1 - p and scaled by 1 / (1 - p), as
    ``torch.nn.functional.dropout``, from 16 random bits per value (PCG64's raw output, four values a draw): on
    CPU torch's generator spends ~10 ns a value, more than the rest of a step of these heads. The rate is
    ``p`` to 1/65536 (within 8e-6) and the scale is that rate's, so the expected input stays exact. Seeded from
    torch's generator: a seeded job draws the same masks."""

    def __init__(self, p: float) -> None:
        self.rng = np.random.default_rng(int(torch.randint(2**62, ())))
        self.threshold = min(round(p * 65536), 65536)  # a value is dropped where its 16 bits are below this
        self.p = self.threshold / 65536

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with dropout applied (in place: pass a tensor of your own)."""
        if self.threshold == 0:
            return x
        if self.threshold == 65536:
            return x.zero_()
        n = x.numel()
        bits = self.rng.bit_generator.random_raw((n + 3) // 4).view(np.uint16)[:n].reshape(x.shape)
        return x.mul_(torch.from_numpy((bits >= np.uint16(self.threshold)) * np.float32(1.0 / (1.0 - self.p))))
