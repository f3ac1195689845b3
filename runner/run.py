"""Entry point: ``python -m runner`` (or the ``runner`` console script) composes ``conf/`` and runs it.

This is the only module that touches ``DictConfig``: it turns the composed config into a typed
:class:`runner.spec.Run` and hands it to the generic executor. Heavy imports (torch, transformers,
mlflow) wait until Hydra has composed, so config errors are reported at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from runner import cli, schema  # noqa: F401  (registers the typed schemas and the ${pkg:} resolver)

if TYPE_CHECKING:
    from runner.spec import Run

log = logging.getLogger("runner")
TARGETS = ["runner.*"]  # what a config's _target_ may name (Hydra 1.4's execution whitelist)
# Hydra instantiates callbacks itself, without a whitelist; ours is trusted, so its warning is noise.
warnings.filterwarnings("ignore", message=r"hydra\.utils\.instantiate\(\) resolved _target_='runner\.")


# conf/ sits beside the package (editable install); an absolute path works under ``python -m`` too.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


cli.register(CONF_DIR)


def main() -> None:
    """The command line (``python -m runner``, the ``runner`` script): raw characters in string values are
    quoted for Hydra's parser (``data.delimiter=;``), then Hydra composes and runs."""
    from runner.distributed import cpu_relaunch, launched_rank
    from runner.errors import RunnerError

    world = launched_rank()[1]
    if world > 1 and {"-m", "--multirun"} & set(sys.argv[1:]):
        print(f"error: --multirun under a launcher ({world} processes) would run every sweep job on every process: "
              f"run the sweep without the launcher, or launch each job on its own", file=sys.stderr)
        sys.exit(RunnerError.exit_code)
    relaunch = cpu_relaunch(sys.argv[1:])
    if relaunch:  # `accelerate launch --cpu --num_processes N` started one process: become the N it asked for
        os.execv(relaunch[0], relaunch)
    sys.argv = [sys.argv[0], *cli.replace_whole(cli.quote_raw_values(sys.argv[1:]))]
    if cli.implied_multirun(sys.argv[1:], CONF_DIR):  # e.g. experiment=trec_kfold_search: a search, no -m needed
        sys.argv.insert(1, "--multirun")
    problems = cli.override_problems(sys.argv[1:])
    if problems:
        print(f"error: {'; '.join(problems)}", file=sys.stderr)
        sys.exit(RunnerError.exit_code)
    hydra_main()


@hydra.main(config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    """Exit codes (``python -m runner``): 0 done; 1 an input the runner cannot honour (config, data,
    model, run folder: one line says what and how to fix it); 3 the loss diverged (NaN/inf);
    128 + N stopped by signal N after a checkpoint (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from runner.errors import RunnerError
    from runner.runfolder import remove_if_unused
    from runner.signals import Interrupted

    hydra_cfg = HydraConfig.get()
    single = hydra_cfg.mode == RunMode.RUN
    run = None
    try:
        from runner.job import execute

        quiet_other_ranks()
        run = build_run(cfg, dict(hydra_cfg.runtime.choices))
        if not single:
            attach_to_sweep(run, hydra_cfg)
        elif default_layout(run, hydra_cfg):
            run = continue_unfinished(run)
        return execute(run)
    except RunnerError as err:
        log.error("error: %s", err)
        if single:
            remove_if_unused(Path(hydra_cfg.runtime.output_dir))  # a run that did no work leaves no folder
            sys.exit(err.exit_code)
        raise  # in a sweep the launcher records the job as failed and goes on
    except (Interrupted, KeyboardInterrupt) as stop:
        if not isinstance(stop, Interrupted):
            log.error("interrupted (Ctrl-C) before training started")
        elif single:
            from runner.runfolder import resume_command

            log.error("%s; to resume: %s", stop, resume_command(Path(run.cfg.output_dir)))
        else:
            log.error("%s; run the same sweep command again to resume", stop)
        sys.exit(getattr(stop, "exit_code", 130))


def default_layout(run: Run, hydra_cfg) -> bool:
    """A single run in Hydra's own timestamped folder (no hydra.run.dir or output_dir given), one process."""
    from runner.distributed import launched_rank

    named = any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra)
    return (not named and run.cfg.output_dir == hydra_cfg.runtime.output_dir and run.cfg.train.resume == "auto"
            and launched_rank()[1] <= 1)


def continue_unfinished(run: Run) -> Run:
    """``train.resume=auto`` in the default layout: the newest unfinished run of the same config goes on in its
    own folder and MLflow run (so the same command resumes an interrupted run); else this new folder."""
    from runner import runfolder

    own = Path(run.cfg.output_dir)
    earlier = runfolder.newest_unfinished(own, run.config_hash())
    if earlier is None:
        return run
    log.info("continuing the unfinished run of the same config in %s (train.resume=never starts a new one)", earlier)
    runfolder.move_log(own, earlier)
    runfolder.remove_if_unused(own)
    return dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, output_dir=str(earlier)))


def quiet_other_ranks() -> None:
    """Under ``accelerate launch`` / ``torchrun`` every process runs this command, one job on all of them
    (``main`` refused ``--multirun`` there): ranks other than 0 log warnings and errors only."""
    from runner.distributed import launched_rank

    if launched_rank()[0] > 0:
        logging.getLogger("runner").setLevel(logging.WARNING)


def build_run(cfg: DictConfig, choices: dict[str, str]) -> Run:
    """The typed run object: config dataclasses plus the components chosen by ``_target_``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from runner.errors import RunnerError
    from runner.spec import Run
    from runner.tasks import make_task

    problems = unknown_keys(cfg)
    if cfg.loss is not None and "_target_" not in cfg.loss:
        problems.append(f"loss.{next(iter(cfg.loss), '')} is set but no loss is chosen (loss=null uses the task's "
                        f"default): pick one first, e.g. loss=ce, loss=focal or loss=mnrl")
    if problems:
        raise RunnerError("; ".join(problems))
    typed = OmegaConf.to_object(cfg)
    objective = typed.objective
    if objective.metrics is not None or objective.directions is not None:
        metrics, directions = list(objective.metrics or []), list(objective.directions or [])
        if not metrics or len(metrics) != len(directions) or len(set(metrics)) != len(metrics):
            raise RunnerError(f"objective.metrics={metrics} and objective.directions={[d.value for d in directions]} must "
                              f"name as many distinct metrics as directions (e.g. [val/accuracy, model/latency_ms] and "
                              f"[maximize, minimize])")
        objective.metric, objective.direction = metrics[0], directions[0]  # the one model selection follows
    problems = schema.check_values(typed)
    if problems:
        raise RunnerError("; ".join(problems))
    try:
        make_pooling = instantiate(cfg.pooling, _partial_=True, _execution_whitelist_=TARGETS)
        mode = instantiate(cfg.mode, _execution_whitelist_=TARGETS)
        strategy = instantiate(cfg.hardware.strategy, _execution_whitelist_=TARGETS) if cfg.hardware.strategy else None
        task = make_task(typed.data.type, typed.task, frozen=mode.frozen_encoder)
        if task.default_objective and objective.metric == "val/accuracy" and "accuracy" not in task.metric_names:
            # the schema's default names a classifier's metric: this task reports another (logged with the run)
            log.info("objective: %s (this task reports no accuracy; set objective.metric to choose another)",
                     task.default_objective)
            objective.metric = task.default_objective
            cfg.objective.metric = task.default_objective  # config.yaml says what ran
        loss_cfg = cfg.loss if cfg.loss is not None else OmegaConf.create(task.default_loss)
        make_loss = instantiate(loss_cfg, _partial_=True, _execution_whitelist_=TARGETS)
    except InstantiationException as err:  # a component refused its arguments: its own message says why
        cause = err.__cause__
        raise RunnerError(str(cause) if isinstance(cause, (RunnerError, ValueError)) else str(err)) from err
    data = typed.data
    if data.given_embeddings:
        if not mode.frozen_encoder or data.type.value != "single" or typed.distill.teacher:
            raise RunnerError("data.embedding_field / data.*_embeddings train a head on given vectors: use "
                              "mode=head_only with data.type=single and no distill.teacher")
        if data.embedding_field and data.train_embeddings:
            raise RunnerError("set data.embedding_field or data.train_embeddings (a file per split), not both")
    if mode.frozen_encoder and not task.has_head and not task.images and not list(make_pooling().parameters()):
        raise RunnerError(
            f"mode=head_only freezes the encoder, and this embedding model ({typed.data.type.value} data, no head) has "
            f"nothing else to train: use mode=full or mode=peft, or pooling=weighted (learned layer weights)"
        )
    family = make_loss.func.family
    if family != task.loss_family:
        raise RunnerError(
            f"loss {loss_cfg._target_.rsplit('.', 1)[-1]} works on {family} outputs, but this run ({typed.data.type.value} "
            f"data, task.architecture={typed.task.architecture.value}) trains on {task.loss_family}: pick a matching loss"
        )
    return Run(
        cfg=typed, make_pooling=make_pooling, mode=mode, task=task, make_loss=make_loss,
        choices={k: str(v) for k, v in choices.items() if not k.startswith(("hydra", "schema"))},
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True), **({"strategy": strategy} if strategy else {}),
    )


def unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys the typed schemas do not have. ``+train.learning_rate=1e-3`` (what Hydra suggests for a
    misspelled key) adds one even to a typed node; the runner would ignore it, so it is an error."""
    problems = []
    schema_type = OmegaConf.get_type(node)
    allowed = {f.name for f in dataclasses.fields(schema_type)} if dataclasses.is_dataclass(schema_type) else None
    for key in node.keys():
        name = f"{prefix}{key}"
        if allowed is not None and key not in allowed:
            problems.append(f"unknown key {name} ({cli.suggestion(str(key), sorted(allowed), prefix)})")
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            problems += unknown_keys(child, name + ".")
    return problems


def attach_to_sweep(run: Run, hydra_cfg) -> None:
    """Make the job's MLflow run a child of its sweep's run, tagged with what this job overrides."""
    from runner.sweep import sweep_parent

    parent = sweep_parent(hydra_cfg.sweep.dir)
    run.parent_run_id = parent.get("run_id")
    run.tags = {"sweep_id": parent.get("sweep_id", str(hydra_cfg.sweep.dir)), "job_num": str(hydra_cfg.job.num),
                "overrides": " ".join(hydra_cfg.overrides.task)}
    from runner.distributed import launched_rank
    from runner.pruning import from_hydra

    run.pruning = from_hydra(hydra_cfg, is_main=launched_rank()[0] == 0)


if __name__ == "__main__":
    main()
