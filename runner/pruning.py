"""Pruning: a search trial stops as soon as its first folds or evaluations show it cannot win.

``hydra.sweeper.pruner`` names an Optuna pruner by ``_target_`` (looked up in :data:`PRUNERS`, never
resolved from a dotted path) with its arguments; ``null`` is off::

    'hydra.sweeper.pruner={_target_: optuna.pruners.MedianPruner, n_warmup_steps: 1}'

Every job of such a search finds its trial through the sweeper's config (the study's storage and name;
job number = trial number, runner/optuna_sweeper.py) and, through the storage, from any process or
machine:

- a k-fold trial reports each finished fold (step = fold index): the running mean of the objective for
  step-based pruners, each fold's own value for ``WilcoxonPruner`` (it compares trials instance by
  instance, the folds being the instances), as Optuna documents for each;
- a single-split trial reports each validation evaluation (step = optimizer step).

After each report the job asks ``should_prune()`` (from the ``hydra.sweeper.prune_after`` -th report of its
unit on: ``{folds: 1, evaluations: 2}`` asks after the first fold, or after the second evaluation); a pruned job raises :class:`TrialPruned`, which the job
turns into a first-class outcome (MLflow run FINISHED with tag ``pruned_at``, the finished folds kept, the
trial's user attribute ``pruned_at``), and the sweeper tells the study PRUNED. Under ``accelerate launch``
rank 0 decides and every rank stops.
"""

from __future__ import annotations

import logging
from typing import Any

from runner.errors import RunnerError, TrialPruned

log = logging.getLogger("runner")

PRUNERS = {f"optuna.pruners.{name}": name for name in (
    "MedianPruner", "PercentilePruner", "SuccessiveHalvingPruner", "HyperbandPruner", "WilcoxonPruner",
    "PatientPruner", "ThresholdPruner", "NopPruner")}


def make_pruner(spec: Any, where: str = "hydra.sweeper.pruner"):
    """An Optuna pruner from ``{_target_: optuna.pruners.X, ...}`` (None when ``spec`` is None); PatientPruner's
    ``wrapped_pruner`` is a spec of its own. An unknown target or argument is one clear error."""
    import inspect

    import optuna

    if spec is None:
        return None
    spec = dict(spec)
    target = spec.pop("_target_", None)
    if target not in PRUNERS:
        raise RunnerError(f"{where}: _target_={target!r} is not a pruner this runner offers; choose one of "
                          f"{', '.join(sorted(PRUNERS))} (or null for no pruning)")
    cls = getattr(optuna.pruners, PRUNERS[target])
    if "wrapped_pruner" in spec:
        spec["wrapped_pruner"] = make_pruner(spec["wrapped_pruner"], f"{where}.wrapped_pruner")
    known = set(inspect.signature(cls).parameters)
    unknown = sorted(set(spec) - known)
    if unknown:
        raise RunnerError(f"{where}: {PRUNERS[target]} has no argument {', '.join(unknown)} (it takes "
                          f"{', '.join(sorted(known))})")
    try:
        return cls(**spec)
    except (TypeError, ValueError) as err:
        raise RunnerError(f"{where}: {PRUNERS[target]}({spec}): {err}") from err


WARMUP_UNITS = {"folds": "fold", "evaluations": "step"}


def prune_warmup(spec: Any) -> dict[str, int]:
    """``hydra.sweeper.prune_after`` as {unit: reports}: how many folds (k-fold) or evaluations (single split) a
    trial reports before the pruner is asked. Optuna's own ``n_warmup_steps`` counts steps, which are fold
    indices in one kind of trial and optimizer steps in the other: a preset that serves both says it here."""
    from omegaconf import OmegaConf

    given = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec or {})
    unknown = sorted(set(given) - set(WARMUP_UNITS))
    bad = [k for k, v in given.items() if k in WARMUP_UNITS and (not isinstance(v, int) or isinstance(v, bool) or v < 1)]
    if unknown or bad:
        raise RunnerError(f"hydra.sweeper.prune_after={given}: give folds and/or evaluations, each a whole number >= 1 "
                          f"(e.g. {{folds: 1, evaluations: 2}})")
    return {WARMUP_UNITS[k]: v for k, v in {"folds": 1, "evaluations": 1, **given}.items()}


def per_instance(pruner) -> bool:
    """Whether the pruner compares trials step by step on each step's own value (Wilcoxon: the folds are
    paired instances), rather than on a running value (median, percentile, successive halving, ...)."""
    import optuna

    inner = getattr(pruner, "_wrapped_pruner", None)
    return isinstance(pruner, optuna.pruners.WilcoxonPruner) or (inner is not None and per_instance(inner))


class Pruning:
    """One job's trial in a search that prunes: reports values and raises :class:`TrialPruned` when told."""

    def __init__(self, storage: str, study_name: str, pruner_spec: Any, trial_number: int, is_main: bool = True,
                 warmup: dict[str, int] | None = None) -> None:
        import optuna

        from runner import reuse
        from runner.study_storage import make_storage

        self.pruner = make_pruner(pruner_spec)
        # one storage object per process (the trials of an in-process search): an engine and a schema check each
        backend = reuse.shared("optuna-storage", [storage], lambda: make_storage(storage))
        self.study = optuna.load_study(study_name=study_name, storage=backend, pruner=self.pruner)
        try:
            trial_id = backend.get_trial_id_from_study_id_trial_number(self.study._study_id, trial_number)
        except KeyError:
            raise RunnerError(f"study {study_name!r} has no trial {trial_number}: run the search through its "
                              f"sweeper") from None
        self.trial = optuna.trial.Trial(self.study, trial_id)
        self.per_instance, self.is_main = per_instance(self.pruner), is_main
        self.values: dict[int, float] = {}
        self.warmup = warmup or {}

    def report(self, step: int, value: float, unit: str, accelerator=None, units: tuple[int, int] = (0, 0)) -> None:
        """Report the objective after ``step`` (a fold index, or an optimizer step) and stop if pruned.
        ``units``: (trained so far, in all) of the job's folds or optimizer steps, for the search's account of
        what pruning saved."""
        self.values[step] = value
        self.record(unit, *units)
        reported = value if self.per_instance or unit != "fold" else sum(self.values.values()) / len(self.values)
        prune = False
        if self.is_main:
            self.trial.report(reported, step)
            prune = len(self.values) >= self.warmup.get(unit, 1) and self.trial.should_prune()
        if accelerator is not None and accelerator.num_processes > 1:  # rank 0 decides, every rank stops
            from accelerate.utils import broadcast_object_list

            prune = broadcast_object_list([prune])[0]
        if prune:
            if self.is_main:
                self.trial.set_user_attr("pruned_at", step)
                self.trial.set_user_attr("pruned_unit", unit)
            raise TrialPruned(step, reported, unit)

    def record(self, unit: str, run: int, total: int) -> None:
        """What the trial has trained so far (folds or optimizer steps, of ``total``): the search's account."""
        if self.is_main:
            self.trial.set_user_attr("units", {"unit": unit, "run": run, "total": total})


def from_hydra(hydra_cfg, is_main: bool = True) -> Pruning | None:
    """The job's :class:`Pruning` when it is a trial of a single-objective runner Optuna search, else None.
    Without a pruner it still reports (``NopPruner`` never prunes): every search records its intermediate values
    and what each trial trained, so an unpruned search's account (sweep/trainings_run) is comparable."""
    from omegaconf import OmegaConf

    sweeper = hydra_cfg.sweeper
    if "runner.optuna_sweeper" not in str(sweeper.get("_target_", "")) or not sweeper.get("storage"):
        return None
    direction = sweeper.get("direction")
    if OmegaConf.is_list(direction) and len(direction) > 1:  # Optuna reports intermediate values of one objective
        return None
    spec = OmegaConf.to_container(sweeper.pruner, resolve=True) if sweeper.get("pruner") is not None else \
        {"_target_": "optuna.pruners.NopPruner"}
    return Pruning(sweeper.storage, sweeper.study_name, spec, int(hydra_cfg.job.num), is_main,
                   prune_warmup(sweeper.get("prune_after")))
