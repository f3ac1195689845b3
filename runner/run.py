"""Entry point: ``python -m runner`` (or the ``runner`` console script) composes ``conf/`` and runs it.

This is the only module that touches ``DictConfig``: it turns the composed config into a typed
:class:`runner.job.Run` and hands it to the generic executor. Heavy imports (torch, transformers,
mlflow) wait until Hydra has composed, so config errors are reported at once.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from runner import schema  # noqa: F401  (registers the typed schemas and the ${pkg:} resolver)

log = logging.getLogger("runner")
TARGETS = ["runner.*"]  # what a config's _target_ may name (Hydra 1.4's execution whitelist)
# Hydra instantiates callbacks itself, without a whitelist; ours is trusted, so its warning is noise.
warnings.filterwarnings("ignore", message=r"hydra\.utils\.instantiate\(\) resolved _target_='runner\.")


# conf/ sits beside the package (editable install); an absolute path works under ``python -m`` too.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from runner.errors import RunnerError

    hydra_cfg = HydraConfig.get()
    try:
        from runner.job import execute

        run = build_run(cfg, dict(hydra_cfg.runtime.choices))
        if hydra_cfg.mode == RunMode.MULTIRUN:
            attach_to_sweep(run, hydra_cfg)
        return execute(run)
    except RunnerError as err:
        log.error("error: %s", err)
        if hydra_cfg.mode == RunMode.RUN:
            sys.exit(1)
        raise  # in a sweep the launcher records the job as failed and goes on


def build_run(cfg: DictConfig, choices: dict[str, str]):
    """The typed run object: config dataclasses plus the components chosen by ``_target_``."""
    from hydra.utils import instantiate

    from runner.errors import RunnerError
    from runner.job import Run
    from runner.tasks import make_task

    typed = OmegaConf.to_object(cfg)
    problems = schema.check_values(typed)
    if problems:
        raise RunnerError("; ".join(problems))
    task = make_task(typed.data.type, typed.task)
    loss_cfg = cfg.loss if cfg.loss is not None else OmegaConf.create(task.default_loss)
    make_loss = instantiate(loss_cfg, _partial_=True, _execution_whitelist_=TARGETS)
    family = make_loss.func.family
    if family != task.loss_family:
        raise RunnerError(
            f"loss {loss_cfg._target_.rsplit('.', 1)[-1]} works on {family} outputs, but this run ({typed.data.type.value} "
            f"data, task.architecture={typed.task.architecture.value}) trains on {task.loss_family}: pick a matching loss"
        )
    return Run(
        cfg=typed,
        make_pooling=instantiate(cfg.pooling, _partial_=True, _execution_whitelist_=TARGETS),
        mode=instantiate(cfg.mode, _execution_whitelist_=TARGETS),
        task=task,
        make_loss=make_loss,
        choices={k: str(v) for k, v in choices.items() if not k.startswith(("hydra", "schema"))},
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
    )


def attach_to_sweep(run, hydra_cfg) -> None:
    """Make the job's MLflow run a child of its sweep's run, tagged with what this job overrides."""
    from runner.sweep import sweep_parent

    parent = sweep_parent(hydra_cfg.sweep.dir)
    run.parent_run_id = parent.get("run_id")
    run.tags = {"sweep_id": parent.get("sweep_id", str(hydra_cfg.sweep.dir)), "job_num": str(hydra_cfg.job.num),
                "overrides": " ".join(hydra_cfg.overrides.task)}


if __name__ == "__main__":
    main()
