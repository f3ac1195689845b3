"""What the command line needs before Hydra parses it: the runner's own ``--help`` (Hydra's help
template, filled from ``conf/``), raw-string values made safe for Hydra's override grammar, and a
log-line prefix that tells joblib-launched jobs apart."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

# Values that are raw characters: ``data.delimiter=;`` or ``data.delimiter=|`` is not valid in Hydra's
# override grammar, and the shell has already eaten the quotes of ``data.delimiter=';'``. Quoted for Hydra.
RAW_STRING_KEYS = ("data.delimiter", "data.text_join", "data.label_separator")
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
