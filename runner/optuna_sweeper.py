"""The Optuna sweeper, made resumable: re-running a search command finishes its study.

``hydra/sweeper=runner_optuna`` (what ``conf/hparams_search/`` presets use) is hydra-optuna-sweeper's
``OptunaSweeper`` with three changes:

- ``n_trials`` is the study's target, not a count to add each time: a study that already has N
  finished trials runs ``n_trials - N`` more (a re-run of a finished study runs none);
- trials left RUNNING by a killed sweep are marked FAIL before resuming (they can never report), and
  each is tried again first, with its own parameters, resuming from its own checkpoints: every trial
  records its job folder (``job_dir``), and the retry runs with ``train.resume=<that folder>``. This
  assumes no other worker is running the same study at that moment; the sampler is reseeded, so the
  resumed search does not draw the already evaluated points again;
- the trials asked per batch follow the launcher's parallelism (``hydra.launcher.n_jobs`` of the
  joblib launcher), so two workers get two trials at a time;
- ``max_failure_rate`` applies to the whole search, not to each batch: with one trial per batch the
  plugin would stop at the first failed trial. A failed trial (an exception, out of memory, a NaN
  loss) is recorded FAIL and the search goes on, until more than that fraction of at least
  ``MIN_TRIALS_BEFORE_ABORT`` trials has failed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf

from runner.errors import RunnerError

log = logging.getLogger("runner")

FINISHED = ("COMPLETE", "FAIL", "PRUNED")
MIN_TRIALS_BEFORE_ABORT = 4


class ResumableOptunaSweeper(OptunaSweeper):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        parallel = config.hydra.launcher.get("n_jobs")
        if parallel is not None:
            self.sweeper.n_jobs = parallel if parallel > 0 else os.cpu_count() or 1
        # the plugin checks its rate per batch; ours is checked over all trials by the launcher wrapper
        self.sweeper.launcher = FailureBudget(self.sweeper.launcher, self.sweeper.max_failure_rate)
        self.sweeper.max_failure_rate = 1.0
        self.sweeper._configure_trials = self.with_job_folders(self.sweeper._configure_trials, config)

    def with_job_folders(self, configure, config: DictConfig):
        """Record each trial's job folder; a retried trial resumes from the folder of the one it replaces."""
        subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
        known = subdir == "${hydra.job.num}"  # conf/config.yaml's layout: <sweep dir>/<job number>

        def configure_trials(trials, *args):
            overrides = list(configure(trials, *args))
            for k, trial in enumerate(trials):
                if known:
                    job_dir = Path(config.hydra.sweep.dir).resolve() / str(self.sweeper.job_idx + k)
                    trial.set_user_attr("job_dir", str(job_dir))
                resume = trial.user_attrs.get("resume_from")
                if resume:
                    log.info("trial %d retries an interrupted trial from its checkpoints in %s", trial.number, resume)
                    overrides[k] = (*overrides[k], f"train.resume={resume}")
            return overrides
        return configure_trials

    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        if impl.storage and impl.study_name:
            done = close_stale_trials(impl.storage, impl.study_name, retry=True)
            if done:
                log.info("study %s has %d finished trials; running %d more to reach n_trials=%d",
                         impl.study_name, done, max(impl.n_trials - done, 0), impl.n_trials)
                # a seeded sampler restarts its random stream in a new process: without a new seed the
                # resumed search would draw the points it already evaluated
                if hasattr(impl.sampler, "reseed_rng"):
                    impl.sampler.reseed_rng()
            impl.n_trials = max(impl.n_trials - done, 0)
        try:
            return impl.sweep(arguments)
        except ValueError as err:
            if "No trials are completed" in str(err):
                raise RunnerError(f"no trial of study {impl.study_name!r} completed: see the failed jobs' logs") from err
            raise


class FailureBudget:
    """Wraps the launcher: counts failed trials over the whole search and stops it past the budget."""

    def __init__(self, launcher, max_failure_rate: float) -> None:
        self.launcher, self.max_failure_rate = launcher, max_failure_rate
        self.launched = self.failed = 0

    def launch(self, job_overrides, initial_job_idx: int):
        from hydra.core.utils import JobStatus

        returns = self.launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        self.launched += len(returns)
        self.failed += sum(r.status == JobStatus.FAILED for r in returns)
        if self.launched >= MIN_TRIALS_BEFORE_ABORT and self.failed / self.launched > self.max_failure_rate:
            raise RunnerError(
                f"{self.failed} of {self.launched} trials failed, more than hydra.sweeper.max_failure_rate="
                f"{self.max_failure_rate}: stopping the search (the failed jobs' logs say why)"
            )
        return returns

    def __getattr__(self, name: str):
        return getattr(self.launcher, name)


def close_stale_trials(storage_url: str, study_name: str, retry: bool = False) -> int:
    """Mark RUNNING trials of an existing study FAIL; return its number of finished trials (0 if new).

    With ``retry``, each such trial that recorded its job folder is enqueued again with the same
    parameters, to resume from that folder's checkpoints.
    """
    import optuna
    from optuna.trial import TrialState

    storage = optuna.storages.get_storage(storage_url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    trials = storage.get_all_trials(study_id, deepcopy=True)
    done = sum(t.state.name in FINISHED for t in trials)
    study = optuna.load_study(study_name=study_name, storage=storage) if retry else None
    for trial in trials:
        if trial.state == TrialState.RUNNING:  # killed mid-trial: it does not count towards n_trials
            log.warning("trial %d was left running by an interrupted sweep: marking it failed", trial.number)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
            job_dir = trial.user_attrs.get("job_dir")
            if study is not None and trial.params and job_dir and Path(job_dir).is_dir():
                study.enqueue_trial(trial.params, user_attrs={"resume_from": job_dir}, skip_if_exists=False)
    return done
