"""One model, start to finish: build it, train it on ``data.train``, evaluate on validation (and test).

Single runs call this once; k-fold calls it once per fold (``runner.cv``).
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from runner import batching, checkpoint, head_fit
from runner.data import Dataset
from runner.distill import Distillation, make_teacher
from runner.errors import RunnerError, TrainingDiverged
from runner.features import FrozenFeatures
from runner.images import processor_for
from runner.model import TextModel, VectorModel, load_encoder
from runner.schema import DataType, Direction
from runner.spec import Run
from runner.tracking import Tracker
from runner.train import Events, LoopParts, TrainState, fit, total_steps

log = logging.getLogger("runner")


@dataclass
class FitResult:
    model: TextModel
    metrics: dict[str, float]
    reports: dict[str, Any]
    best_step: int
    steps: int
    best: float | None = None  # best value of the monitored val/* metric during training


def fit_and_evaluate(run: Run, data: Dataset, tokenizer, accelerator, tracker: Tracker, workdir: Path,
                     frozen: FrozenFeatures | None = None) -> FitResult:
    """Build a fresh model, train it on ``data.train`` and evaluate on validation (and test).

    Checkpoints go to ``workdir/checkpoints``; with ``train.resume`` a whole one found there (or named)
    is restored, and training continues from its step as if it had never stopped. With ``frozen``
    (a frozen encoder's output per text) batches carry those vectors instead of token ids.
    """
    cfg, train_cfg, task = run.cfg, run.cfg.train, run.task
    task.prepare(tokenizer, data.label_names, cfg.model)  # e.g. the class prompts of zero-shot evaluation
    encoded = {name: dataset_of(run, split, tokenizer, frozen, data.label_names)
               for name, split in (("train", data.train), ("val", data.validation), ("test", data.test)) if split}
    eval_bs = train_cfg.eval_batch_size or 2 * train_cfg.batch_size
    grouped = train_cfg.group_by_length if train_cfg.group_by_length is not None else task.loss_family == "logits"
    # train.batch_size is per process: N processes train on batches of N * batch_size, cut in N (ShardedBatches)
    world = accelerator.num_processes
    train_loader = batching.make_loader(encoded.pop("train"), tokenizer, train_cfg.batch_size * world, train=True,
                                        seed=train_cfg.seed, group_by_length=grouped, workers=cfg.hardware.num_workers)
    sampler = train_loader.batch_sampler  # the loop positions it every epoch
    eval_loaders = {k: batching.for_processes(batching.make_loader(v, tokenizer, eval_bs * world, train=False), accelerator)
                    for k, v in encoded.items()}

    if data.train.vectors is not None:  # given embeddings: the model is the head
        model = VectorModel(data.train.vectors.shape[1], task.num_outputs(data.label_names), train_cfg.head_dropout,
                            run.make_pooling().normalize)
    else:
        model = build_model(run, len(tokenizer), task.num_outputs(data.label_names), frozen.encoder if frozen else None)
    loss_fn = make_loss(run, model, data, tokenizer)
    # fused AdamW: one kernel per step instead of a loop over tensors (the Hugging Face Trainer's default too)
    optimizer = torch.optim.AdamW(param_groups(model, train_cfg.lr, train_cfg.head_lr, train_cfg.weight_decay), fused=True)
    total = total_steps(train_cfg, len(train_loader))  # optimizer steps of the whole training
    scheduler = make_scheduler(train_cfg.scheduler.value, optimizer, total, train_cfg.warmup_ratio)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    train_loader = batching.for_processes(train_loader, accelerator)
    loss_fn.to(accelerator.device)  # not prepared: it holds no trained weights (a teacher is frozen)
    parts = LoopParts(model, loss_fn, train_loader, sampler, optimizer, scheduler, accelerator)

    last: dict[str, tuple[int, dict, dict]] = {}  # split -> (step, metrics, report) of the latest evaluation
    # Model selection looks at validation only: a test/* objective is monitored through its val/* twin.
    monitor = "val/" + cfg.objective.metric.split("/", 1)[1]

    def evaluate(step: int, splits=("val",)) -> dict[str, float]:
        metrics = {}
        for split in splits:
            text_ids = encoded[split].text_ids.numpy()
            # a bar per evaluation: scoring a large split can take minutes, which must not look like a hang
            loader = tqdm(eval_loaders[split], desc=f"step {step}: {split}", unit="batch", leave=False,
                          disable=not (train_cfg.progress and accelerator.is_main_process))
            # the per-class report of the last evaluation is the one kept: earlier ones are not computed
            final = step >= total or (split != "val" and step > 0)  # a test score at step 0 is never the last
            values, report = task.evaluate(model, loader, accelerator, split, data.label_names, text_ids, report=final)
            metrics.update(values)
            last[split] = (step, values, report)
        tracker.log_metrics(metrics, step)
        log.info("step %d: %s", step, format_metrics(metrics))
        if run.pruning is not None and cfg.cv.folds <= 1 and step > 0 and monitor in metrics:  # k-fold reports folds
            run.pruning.report(step, metrics[monitor], "step", accelerator, units=(step, total))
        return metrics

    def log_train(metrics: dict[str, float], step: int) -> None:
        tracker.log_metrics(metrics, step)
        if not train_cfg.progress:  # no bar to show it (logs of batch jobs, CI): a line per train/loss log
            log.info("step %d: train/loss=%.4f  train/lr=%.3g", step, metrics["train/loss"], metrics["train/lr"])

    roots = workdir / "checkpoints"
    meta = {"fingerprint": run.fingerprint(), "config_hash": run.config_hash(), "mlflow_run_id": tracker.run_id}

    def save_checkpoint(state: TrainState):
        if not accelerator.is_main_process:
            return None
        if tracker.run_id:
            tracker.flush()  # the metrics up to this step are in the store before the step is
        folder = checkpoint.save(roots, state, parts, meta)
        checkpoint.prune(roots, train_cfg.keep_checkpoints, state.best_step if state.best is not None else None)
        return folder

    state = TrainState(sampler_seed=train_cfg.seed)
    start = resume_point(train_cfg.resume, roots)
    if start is not None:
        checkpoint.restore(start, state, parts, meta["fingerprint"])
        log.info("resuming from %s: step %d, epoch %d, batch %d of the epoch", start, state.step, state.epoch, state.batch)
    elif train_cfg.eval_at_start:
        evaluate(0, tuple(eval_loaders))  # the untrained model: the gain from training is visible in MLflow
    loop = head_fit.fit_vectors if head_fit.applies(parts, train_cfg) else fit
    with logging_redirect_tqdm():  # log lines print above the progress bar, not through it
        loop(parts, state, train_cfg, Events(log_train, evaluate, save_checkpoint), monitor,
             cfg.objective.direction == Direction.maximize)
    # The final model is scored on test, and on val unless the loop's last evaluation already scored
    # these very weights (no early-stopping restore).
    fresh = state.best_weights is None and last.get("val", (None,))[0] == state.step
    again = tuple(s for s in eval_loaders if s != "val" or not fresh)
    if again:
        evaluate(state.step, again)
    metrics = {k: v for _, values, _ in last.values() for k, v in values.items()}
    reports = {split: report for split, (_, _, report) in last.items() if report}
    check_finite(metrics, accelerator.unwrap_model(model), state.step)
    if accelerator.is_main_process and not train_cfg.keep_checkpoints_after_run:
        shutil.rmtree(roots, ignore_errors=True)  # the saved model is what a finished run keeps
    return FitResult(accelerator.unwrap_model(model), metrics, reports, state.best_step, state.step, state.best)


def check_finite(metrics: dict[str, float], model: torch.nn.Module, step: int) -> None:
    """The final weights and every final metric must be finite: a model that diverged after its last logged
    loss (or whose outputs are all NaN) is never saved, logged as a result or used to predict."""
    bad = sorted(k for k, v in metrics.items() if v is None or not math.isfinite(v))
    if bad:
        raise TrainingDiverged(f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not finite after step {step}: the "
                               f"model diverged and is not saved; lower train.lr or use precision=fp32")
    for name, weight in model.named_parameters():  # a frozen weight cannot have diverged: 22M MiniLM weights unread
        if weight.requires_grad and not torch.isfinite(weight).all():
            raise TrainingDiverged(f"weight {name} holds NaN or infinite values after step {step}: the model diverged "
                                   f"and is not saved; lower train.lr or use precision=fp32")


def dataset_of(run: Run, split, tokenizer, frozen: FrozenFeatures | None, label_names: list = ()):
    """Token ids of a split's texts, or rows of the frozen features (head_only)."""
    task, joint = run.task, run.task.joint and len(split.columns) == 2
    targets = task.scale_targets(split.labels)
    if task.images and split.vectors is None:  # paths and captions (data.type=image: each class's prompt is the caption)
        prompts = None if len(split.columns) > 1 else task.prompts(label_names)  # one per class, formatted once
        captions = split.columns[1] if prompts is None else [prompts[i] for i in split.labels]
        model = run.cfg.model
        return batching.ImageSplit(processor_for(run.cfg.model), tokenizer, split.columns[0], captions, targets,
                                   model.max_length, model.text_prefix, model.text_padding)
    if split.vectors is not None:
        return batching.FrozenSplit(torch.from_numpy(split.vectors), torch.arange(len(split))[None], targets)
    if frozen is not None:
        items = [list(zip(*split.columns))] if joint else split.columns
        rows = torch.stack([frozen.rows_of(col) for col in items])
        pooled = frozen.pooled(run.make_pooling())
        if pooled is not None:  # the same numbers as pooling every batch, computed once
            return batching.FrozenSplit(pooled, rows, targets, key="pooled")
        return batching.FrozenSplit(frozen.vectors, rows, targets)
    return batching.Encoded(tokenizer, split.columns, targets, run.cfg.model.max_length, run.cfg.model.text_prefix,
                            joint=joint)


def uses_frozen_features(run: Run, data: Dataset) -> bool:
    """head_only runs its encoder once per text, unless a distillation teacher needs the tokens (or the
    data brings its embeddings)."""
    # texts on disk (runner.streaming) are not all encoded up front: the encoder runs on the batches used
    return (run.mode.frozen_encoder and not run.cfg.distill.teacher and data.train.vectors is None
            and not data.train.streamed and not run.task.images)


def job_features(run: Run, data: Dataset, tokenizer, accelerator) -> FrozenFeatures:
    """The frozen encoder's output for every text of the job, through the disk cache (``cache``)."""
    from runner import reuse
    from runner.features import frozen_features
    from runner.model import weights_hash

    cfg = run.cfg

    def frozen_encoder():
        encoder = run.mode.apply(load_encoder(cfg.model, len(tokenizer))).to(accelerator.device)
        return encoder, weights_hash(encoder)

    # a frozen encoder never trains: the trials of a search in one process share it (runner/reuse.py)
    encoder, weights = frozen_encoder() if cfg.model.random_init else reuse.shared(
        "frozen-encoder", [cfg.model, cfg.mode, len(tokenizer), str(accelerator.device)], frozen_encoder,
        cfg.model.name_or_path)
    cache_dir = Path(cfg.cache.dir or "outputs/cache").resolve() if cfg.cache.enabled else None
    precision = accelerator.mixed_precision  # "no", "bf16" or "fp16": the vectors depend on it
    return frozen_features(encoder, tokenizer, data, max_length=cfg.model.max_length, prefix=cfg.model.text_prefix,
                           layers=run.make_pooling().layers, joint=run.task.joint and cfg.data.type == DataType.pair,
                           dtype=precision, cache_dir=cache_dir, accelerator=accelerator, weights=weights)


def resume_point(resume: str, roots: Path) -> Path | None:
    """The checkpoint to start from: ``auto`` the newest whole one in this run folder, ``never`` none,
    or a named checkpoint folder (or a folder of checkpoints: its newest whole one). A named run folder
    never gets here: ``job.execute`` adopts it and resumes ``auto``."""
    if resume == "never":
        return None
    if resume == "auto":
        return checkpoint.find_latest(roots)
    named = Path(resume)
    if not named.is_dir():
        raise RunnerError(f"train.resume={resume}: no such folder; give a checkpoint folder, auto or never")
    if (named / checkpoint.MARKER).exists() or named.name.startswith(checkpoint.PREFIX):
        problem = checkpoint.verify(named)
        if problem:
            raise RunnerError(f"train.resume={resume}: not a usable checkpoint: {problem}")
        return named
    found = checkpoint.find_latest(named)
    if found is None:
        raise RunnerError(f"train.resume={resume}: no whole checkpoint in that folder")
    return found


def make_loss(run: Run, model: TextModel, data: Dataset, tokenizer=None):
    """The configured loss (or the task's default), prepared on the training targets, with distillation."""
    loss_fn = run.make_loss()
    loss_fn.prepare(data.train.labels)
    if run.cfg.distill.teacher and run.task.images:
        from runner.distill import ImageTextDistillation, dual_teacher

        teacher = dual_teacher(run.cfg.distill, model, processor_for(run.cfg.model), tokenizer)
        return ImageTextDistillation(loss_fn, teacher, run.cfg.distill)
    if run.cfg.distill.teacher:
        teacher, on_logits = make_teacher(run.cfg.distill, model, lambda name: encoder_model(run, name))
        loss_fn = Distillation(loss_fn, teacher, run.cfg.distill, on_logits)
    return loss_fn


def build_model(run: Run, vocab_size: int, num_outputs: int | None, frozen_encoder=None) -> TextModel:
    """Encoder (loaded, or the job's frozen one), mode applied, pooling and head."""
    if run.task.images:
        from runner import dual

        model = dual.build(run.cfg.model, run.mode, vocab_size)
        log.info("model: %s", dual.describe(model))
        return model
    if frozen_encoder is not None:
        encoder = frozen_encoder
    else:
        encoder = load_encoder(run.cfg.model, vocab_size, run.mode.load_options())
        if run.cfg.train.gradient_checkpointing:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        encoder = run.mode.apply(encoder)
    return TextModel(encoder, run.make_pooling(), num_outputs, run.cfg.train.head_dropout, run.mode.frozen_encoder)


def encoder_model(run: Run, name_or_path: str) -> TextModel:
    """Another encoder with this run's pooling and no head (a distillation teacher)."""
    from dataclasses import replace

    encoder = load_encoder(replace(run.cfg.model, name_or_path=name_or_path, random_init=None), 0)
    return TextModel(encoder, run.make_pooling(), None)


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


