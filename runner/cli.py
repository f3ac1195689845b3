"""What the command line needs before Hydra parses it: the runner's own ``--help`` (Hydra's help
template, filled from ``conf/``), raw-string values made safe for Hydra's override grammar, and a
log-line prefix that tells joblib-launched jobs apart."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

# Values that are raw characters: ``data.delimiter=;`` or ``data.delimiter=|`` is not valid in Hydra's
# override grammar, and the shell has already eaten the quotes of ``data.delimiter=';'``. Quoted for Hydra.
RAW_STRING_KEYS = ("data.delimiter", "data.text_join", "data.label_separator", "task.prompt")
HIDDEN_GROUPS = ("hydra", "schema")  # Hydra's own and the internal typed schemas

EXAMPLES = """\
  python -m runner                                            MiniLM fine-tuned on the shipped demo data (offline, CPU)
  python -m runner model=e5 mode=peft data=sst2 cv.folds=5    LoRA, stratified 5-fold, mean ± std
  python -m runner -m hparams_search=head_lr cv.folds=3       Bayesian search (Optuna), resumable
  python -m runner experiment=trec_kfold_search               a complete setup from conf/experiment/"""


def quote_raw_values(args: list[str]) -> list[str]:
    """``data.delimiter=;`` -> ``data.delimiter=';'`` (already quoted values are left alone)."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in RAW_STRING_KEYS and value and value[0] not in "'\"":
            arg = f"{key}='{value.replace(chr(92), chr(92) * 2).replace(chr(39), chr(92) + chr(39))}'"
        out.append(arg)
    return out


# What users of the Hugging Face Trainer, sentence-transformers and pandas type, and the runner's name for it:
# "did you mean" by meaning, where spelling alone would point elsewhere (text_column -> text_join).
MEANINGS = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "per_device_train_batch_size":
    "batch_size", "train_batch_size": "batch_size", "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "scheduler", "warmup": "warmup_ratio",
    "eval_steps": "eval_every", "logging_steps": "log_every", "save_steps": "checkpoint_every",
    "save_total_limit": "keep_checkpoints", "resume_from_checkpoint": "resume", "model_name_or_path": "name_or_path",
    "max_seq_length": "max_length", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "text_column": "text_field", "text_col": "text_field", "text": "text_field", "sentence_column": "text_field",
    "label_column": "label_field", "label_col": "label_field", "target_column": "label_field", "label": "label_field",
    "text_columns": "text_fields", "sep": "delimiter", "separator": "delimiter", "train_file": "train",
    "validation_file": "validation", "dev": "validation", "test_file": "test", "n_folds": "folds", "k": "folds",
    "model_name": "name_or_path", "model_path": "name_or_path", "seq_len": "max_length", "metric": "metric",
}


def suggestion(key: str, allowed: list[str], prefix: str) -> str:
    """``did you mean <prefix><key>?`` by meaning first, then by spelling; else the known keys."""
    import difflib

    close = [MEANINGS[key]] if MEANINGS.get(key) in allowed else difflib.get_close_matches(key, sorted(allowed), n=1)
    return f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(sorted(allowed))}"


REPLACED_WHOLE = ("hydra.sweeper.pruner",)  # a component given by _target_: a new one replaces the preset's


def replace_whole(args: list[str]) -> list[str]:
    """``hydra.sweeper.pruner={...}`` replaces a preset's pruner rather than merging into it (Hydra merges a
    dict into a dict: ThresholdPruner would get MedianPruner's arguments, or fail on keys the preset lacks):
    the key is set to null first, then to the given value."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in REPLACED_WHOLE and value.strip() not in ("null", "None", ""):
            out.append(f"{key}=null")
        out.append(arg)
    return out


def override_problems(args: list[str]) -> list[str]:
    """Overrides of keys the typed schema does not have, in the runner's words, before Hydra says "use +key"
    (which the runner then refuses): ``train.learning_rate=1e-3`` -> did you mean train.lr? Only groups with one
    fixed schema are checked here; per-option groups (mode, loss, ...) are checked after composition."""
    import dataclasses
    import typing

    from runner.schema import RunConfig

    problems = []
    for arg in args:
        key, sep, _ = arg.partition("=")
        if not sep or arg.startswith(("-", "+", "~")) or "." not in key or key.startswith("hydra."):
            continue
        node, parts = RunConfig, key.split(".")
        for depth, part in enumerate(parts):
            hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else None
            if hints is None:
                break  # a free-form value (dict, Any, a per-option group): nothing to check here
            if part not in hints:
                prefix = ".".join(parts[:depth]) + "."
                problems.append(f"unknown key {key} ({suggestion(part, list(hints), prefix)})")
                break
            node = hints[part]
            args_of = [a for a in typing.get_args(node) if dataclasses.is_dataclass(a)]  # X | None
            node = args_of[0] if args_of else node
    return problems


def implied_multirun(args: list[str], conf_dir: str | Path) -> bool:
    """Whether a chosen option (``experiment=trec_kfold_search``) sets ``hydra.mode: MULTIRUN`` itself, so that
    its command runs without ``-m``. Hydra refuses a mode that changes during composition ("set it directly in
    the primary config or on the command line"): the command line gets the flag it implies instead."""
    import yaml

    if {"-m", "--multirun"} & set(args):
        return False
    for arg in args:
        group, sep, option = arg.lstrip("+").partition("=")
        path = Path(conf_dir) / group / f"{option}.yaml"
        if not sep or "/" in option or not path.is_file():
            continue
        try:
            content = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        if str((content.get("hydra") or {}).get("mode", "")).upper() == "MULTIRUN":
            return True
    return False


def config_groups(conf_dir: str | Path) -> dict[str, list[str]]:
    """Group -> option names, from the yaml files under ``conf/`` (internal groups left out)."""
    root = Path(conf_dir)
    groups: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.yaml")):
        group = path.parent.relative_to(root).as_posix()
        if group != "." and not group.startswith(HIDDEN_GROUPS):
            groups.setdefault(group, []).append(path.stem)
    return groups


def help_text(conf_dir: str | Path) -> str:
    width = max(len(g) for g in config_groups(conf_dir))
    groups = "\n".join(f"  {g:<{width}}  {', '.join(options)}" for g, options in config_groups(conf_dir).items())
    return f"""runner: fine-tune and evaluate text encoders (classifiers, regressors, embedders) from one composed config.

Usage: python -m runner [GROUP=OPTION ...] [KEY=VALUE ...] [-m for sweeps]   (or the `runner` command)

Config groups (pick one option per group, e.g. model=e5 pooling=cls):
{groups}

Examples:
{EXAMPLES}

Any value can be set with KEY=VALUE (train.lr=3e-5 data.train=my.csv); `--cfg job` prints the composed
config without running it. Characters such as ; or | need no extra quoting in data.delimiter.

Outputs: outputs/runs/<date>/<time>/ (metrics.json, model/, checkpoints/, runner.log) for a run,
outputs/sweeps/<date>/<time>/<job>/ under -m; MLflow store outputs/mlflow.db (mlflow ui --backend-store-uri
sqlite:///outputs/mlflow.db); frozen-encoder cache outputs/cache/.

Hydra's own flags (--multirun, --cfg, --shell-completion, ...):
$FLAGS_HELP"""


def job_prefix(mode, num) -> str:
    """``[job 3] `` for the jobs of a sweep, nothing for a single run (console log format)."""
    return f"[job {num}] " if "MULTI" in str(mode) else ""


def register(conf_dir: str | Path) -> None:
    if not OmegaConf.has_resolver("runner_help"):
        OmegaConf.register_resolver("runner_help", lambda: help_text(conf_dir))
        OmegaConf.register_resolver("runner_job_prefix", job_prefix)
