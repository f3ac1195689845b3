"""Entry point: ``python -m runner`` (or the ``runner`` console script) composes ``conf/`` and runs it.

This is the only module that touches ``DictConfig``: it turns the composed config into a typed
:class:`runner.job.Run` and hands it to the generic executor. Heavy imports (torch, transformers,
mlflow) wait until Hydra has composed, so config errors are reported at once.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from runner import schema  # noqa: F401  (registers the typed schemas and the ${pkg:} resolver)

log = logging.getLogger("runner")
TARGETS = ["runner.*"]  # what a config's _target_ may name (Hydra 1.4's execution whitelist)


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

        return execute(build_run(cfg, dict(hydra_cfg.runtime.choices)))
    except RunnerError as err:
        log.error("error: %s", err)
        if hydra_cfg.mode == RunMode.RUN:
            sys.exit(1)
        raise  # in a sweep the launcher records the job as failed and goes on


def build_run(cfg: DictConfig, choices: dict[str, str]):
    """The typed run object: config dataclasses plus the components chosen by ``_target_``."""
    from hydra.utils import instantiate

    from runner.job import Run

    return Run(
        cfg=OmegaConf.to_object(cfg),
        make_pooling=instantiate(cfg.pooling, _partial_=True, _execution_whitelist_=TARGETS),
        mode=instantiate(cfg.mode, _execution_whitelist_=TARGETS),
        choices={k: str(v) for k, v in choices.items() if not k.startswith(("hydra", "schema"))},
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
    )


if __name__ == "__main__":
    main()
