"""The Optuna sweeper, for one worker or many: several processes (or machines) run the same search command
against one Optuna storage and share its trials.

``hydra/sweeper=runner_optuna`` (what ``conf/hparams_search/`` presets use) is hydra-optuna-sweeper's
``OptunaSweeper`` with its own ask-launch-tell loop:

- ``n_trials`` is the study's target of COMPLETE trials, whoever runs them: a worker asks for a trial
  only while COMPLETE + running trials are fewer, and waits while the last ones run elsewhere (one of
  them may die). A trial asked by two workers at the same moment beyond the target is marked FAIL
  unlaunched (user attribute ``surplus``). Re-running a finished study's command runs nothing;
- ``hydra.sweeper.storage``: an RDB URL (``postgresql://``, ``mysql://``, ``sqlite:///``) or a journal file
  (``journal:/path/study.log``, for a shared file system without a database server);
- heartbeats: Optuna beats only inside ``study.optimize``, which Hydra's sweeper does not use, so this
  sweeper does: every ``heartbeat_interval`` seconds it stamps each trial it runs (time, host, pid).
  A RUNNING trial whose stamp is older than ``grace_period``, or whose process is gone from this host,
  was killed: any worker marks it FAIL, marks its MLflow run KILLED and asks the study to try its
  parameters again, resuming from its checkpoints (``job_dir``) where that folder is reachable;
- a job's number (and folder, ``<sweep dir>/<n>``) is its trial's number: unique across workers, so
  workers may share one ``hydra.sweep.dir``;
- the trials run per batch follow the launcher's parallelism (``hydra.launcher.n_jobs`` of joblib);
- ``max_failure_rate`` applies to the whole search, not to each batch: a failed trial (an exception, out
  of memory, a NaN loss) is recorded FAIL and the search goes on, until more than that fraction of at
  least ``MIN_TRIALS_BEFORE_ABORT`` trials has failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf

from runner.errors import RunnerError
from runner.pruning import make_pruner, prune_warmup
from runner.runfolder import is_run_folder
from runner.study_storage import make_storage
from runner.sweep import kill_runs_of

log = logging.getLogger("runner")

MIN_TRIALS_BEFORE_ABORT = 4
HEARTBEAT = "heartbeat"  # trial user attribute: {"time": epoch seconds, "host": ..., "pid": ...}


@dataclass
class RunnerOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "runner.optuna_sweeper.ResumableOptunaSweeper"
    heartbeat_interval: int = 10  # seconds between the stamps of a running trial
    grace_period: int = 60  # a trial unstamped this long was killed (beyond clock skew between machines)
    # an optuna.pruners class by _target_ with its arguments (runner/pruning.py), or null: no pruning
    pruner: Any = None
    # folds (k-fold trials) or evaluations (single-split trials) a trial reports before the pruner is asked:
    # a warm-up in the trial's own units, whichever kind of trial the search runs
    prune_after: dict = field(default_factory=lambda: {"folds": 1, "evaluations": 1})


class ResumableOptunaSweeper(OptunaSweeper):
    def __init__(self, *args, heartbeat_interval: int = 10, grace_period: int = 60, pruner: Any = None,
                 prune_after: Any = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        prune_warmup(prune_after)  # a bad value: one line before any trial runs
        self.pruner_spec = OmegaConf.to_container(pruner, resolve=True) if OmegaConf.is_config(pruner) else pruner
        if heartbeat_interval <= 0 or grace_period <= heartbeat_interval:
            raise RunnerError(f"hydra.sweeper.grace_period={grace_period} must exceed heartbeat_interval="
                              f"{heartbeat_interval} (> 0): a live trial would look killed")
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        parallel = config.hydra.launcher.get("n_jobs")
        if parallel is not None:
            self.sweeper.n_jobs = parallel if parallel > 0 else os.cpu_count() or 1
        self.budget = FailureBudget(self.sweeper.launcher, self.sweeper.max_failure_rate, self.sweeper.n_trials)
        subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
        self.job_dirs = subdir == "${hydra.job.num}"  # conf/config.yaml's layout: <sweep dir>/<job number>
        self.config = config

    def sweep(self, arguments: list[str]) -> None:
        import optuna
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

        impl = self.sweeper
        if not (impl.storage and impl.study_name):
            raise RunnerError("hydra.sweeper.storage and hydra.sweeper.study_name must be set: the study is what workers "
                              "share and what a re-run resumes")
        if getattr(impl.sampler, "func", None) is optuna.samplers.GridSampler:
            raise RunnerError("hydra/sweeper/sampler=grid: use a grid sweep (-m with comma-separated values) instead")
        impl._process_searchspace_config()
        params = [*impl._parse_sweeper_params_config(), *arguments]
        space, fixed_params, fixed_overrides = create_params_from_overrides(params)
        for name in fixed_params:
            space.pop(name, None)
        pruner = make_pruner(self.pruner_spec)  # an unknown pruner or argument: one line before any trial runs
        if pruner is not None and len(impl._get_directions()) > 1:
            raise RunnerError("hydra.sweeper.pruner: Optuna prunes single-objective searches only; this search has "
                              f"{len(impl._get_directions())} objectives: set hydra.sweeper.pruner=null")
        study = optuna.create_study(study_name=impl.study_name, storage=make_storage(impl.storage), sampler=impl.sampler,
                                    directions=impl._get_directions(), load_if_exists=True, pruner=pruner)
        trials = Trials(study, self.heartbeat_interval, self.grace_period, lambda job_dir: kill_runs_of(self.config, job_dir))
        done, pending = trials.counts()
        if done:
            log.info("study %s has %d COMPLETE trials of n_trials=%d", impl.study_name, done, impl.n_trials)
        # a seeded sampler in a second worker, or in a resumed search, would draw the points already drawn
        if (done or pending) and hasattr(impl.sampler, "reseed_rng"):
            impl.sampler.reseed_rng()
        try:
            while True:
                trials.fail_stale()
                complete, running = trials.counts()
                if complete >= impl.n_trials:
                    break
                room = impl.n_trials - complete - running
                if room <= 0:  # the last trials run elsewhere: wait for them to finish (or to be found dead)
                    time.sleep(self.heartbeat_interval)
                    continue
                batch = trials.ask(min(impl.n_jobs, room), impl.n_trials)
                if not batch:
                    continue
                overrides = list(impl._configure_trials(batch, space, fixed_params, fixed_overrides))
                self.launch(trials, batch, overrides)
        finally:
            trials.stop()
        if not done and impl.n_trials <= 0:  # the loop ends with n_trials >= 1 COMPLETE trials, else nothing ran
            raise RunnerError(f"hydra.sweeper.n_trials={impl.n_trials}: study {impl.study_name!r} has no COMPLETE trial")
        if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            raise RunnerError(f"study {impl.study_name!r}: every trial was pruned, none completed: loosen "
                              f"hydra.sweeper.pruner (e.g. n_startup_trials or n_warmup_steps)")
        if len(study.directions) > 1:  # a Pareto search: the front, not one best trial
            front = study.best_trials
            log.info("Pareto front of %s: %d trials: %s", impl.study_name, len(front),
                     "; ".join(f"trial {t.number} {t.values}" for t in front))
            results = {"name": "optuna", "pareto_front": [{"number": t.number, "params": t.params, "values": t.values}
                                                          for t in front]}
        else:
            best = study.best_trial
            log.info("best of %s: %s = %s", impl.study_name, best.params, best.value)
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
        OmegaConf.save(OmegaConf.create(results), f"{self.config.hydra.sweep.dir}/optimization_results.yaml")

    def launch(self, trials: Trials, batch: list, overrides: list) -> None:
        """Run a batch of trials, each as job number = trial number, beating while they run; tell results."""
        for k, trial in enumerate(batch):
            if self.job_dirs:
                trial.set_user_attr("job_dir", str(Path(self.config.hydra.sweep.dir).resolve() / str(trial.number)))
            resume = trial.user_attrs.get("resume_from")
            if resume and is_run_folder(Path(resume)):  # killed before it saved anything: it starts afresh
                log.info("trial %d retries an interrupted trial from its checkpoints in %s", trial.number, resume)
                overrides[k] = (*overrides[k], f"train.resume={resume}")
        # consecutive trial numbers launch together (job numbers = trial numbers); another worker's ask in
        # between splits the batch
        start = 0
        while start < len(batch):
            end = start + 1
            while end < len(batch) and batch[end].number == batch[end - 1].number + 1:
                end += 1
            with trials.beating(batch[start:end]):
                returns = self.budget.launch(overrides[start:end], initial_job_idx=batch[start].number)
            for trial, ret in zip(batch[start:end], returns):
                trials.tell(trial, ret)
            self.budget.check()  # after the tells: a stopped search leaves no trial RUNNING
            start = end


class Trials:
    """This worker's view of the shared study: counts, asks, heartbeats, stale trials, tells."""

    def __init__(self, study, interval: int, grace: int, on_killed) -> None:
        self.study, self.interval, self.grace, self.on_killed = study, interval, grace, on_killed
        self.storage = study._storage
        self.mine: dict[int, object] = {}  # trial id -> trial, while this worker runs it
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.beat_forever, daemon=True, name="optuna-heartbeat")
        self.thread.start()

    def counts(self) -> tuple[int, int]:
        """(done trials: COMPLETE or PRUNED, RUNNING trials). WAITING ones (retries of killed trials) are what
        the next ``ask`` returns, so they leave room for asking. A PRUNED trial is an outcome, like Optuna's
        own ``n_trials``: it is never run again."""
        from optuna.trial import TrialState

        states = [t.state for t in self.study.get_trials(deepcopy=False)]
        return states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED), states.count(TrialState.RUNNING)

    def ask(self, n: int, target: int) -> list:
        """``n`` new trials, stamped at once; any beyond ``target`` (asked by two workers at the same moment)
        are marked FAIL unlaunched."""
        from optuna.trial import TrialState

        asked = []
        for _ in range(n):
            trial = self.study.ask()
            self.stamp(trial._trial_id)
            asked.append(trial)
        done = (TrialState.COMPLETE, TrialState.PRUNED)
        ahead = [t for t in self.study.get_trials(deepcopy=False, states=(*done, TrialState.RUNNING))
                 if t.state in done or t.number < asked[0].number]
        keep = max(0, min(len(asked), target - len(ahead)))
        for trial in asked[keep:]:
            trial.set_user_attr("surplus", True)
            self.study.tell(trial, state=TrialState.FAIL)
            log.info("trial %d is beyond n_trials=%d (asked by two workers at once): not run", trial.number, target)
        return asked[:keep]

    def stamp(self, trial_id: int) -> None:
        self.storage.set_trial_user_attr(trial_id, HEARTBEAT, {"time": time.time(), "host": socket.gethostname(),
                                                               "pid": os.getpid()})

    @contextlib.contextmanager
    def beating(self, trials: list):
        with self.lock:
            self.mine.update({t._trial_id: t for t in trials})
        try:
            yield
        finally:
            with self.lock:
                for t in trials:
                    self.mine.pop(t._trial_id, None)

    def beat_forever(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                ids = list(self.mine)
            for trial_id in ids:
                try:
                    self.stamp(trial_id)
                except Exception as err:  # noqa: BLE001  (a storage hiccup must not kill the trial; the next beat retries)
                    log.warning("heartbeat of trial %d failed: %s", trial_id, err)

    def stop(self) -> None:
        self.stopped.set()

    def stale(self, trial) -> bool:
        beat = trial.user_attrs.get(HEARTBEAT)
        if beat is None:  # never stamped (asked by an older runner, or its worker died at once)
            started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
            return time.time() - started > 2 * self.interval
        if beat.get("host") == socket.gethostname() and beat.get("pid") != os.getpid() and not alive(beat.get("pid")):
            return True  # its worker ran on this machine and is gone: no need to wait for the grace period
        return time.time() - float(beat["time"]) > self.grace

    def fail_stale(self) -> None:
        """Mark trials whose worker died FAIL (and their MLflow runs KILLED); enqueue each again, resuming
        from its folder's checkpoints."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        for trial in self.study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
            if trial._trial_id in self.mine or not self.stale(trial):
                continue
            try:
                self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except (UpdateFinishedTrialError, RuntimeError):
                continue  # another worker got there first
            log.warning("trial %d stopped beating (its worker was killed): marked FAIL, to be tried again", trial.number)
            job_dir = trial.user_attrs.get("job_dir")
            if job_dir:
                self.on_killed(job_dir)
            if trial.params and not trial.user_attrs.get("surplus"):
                self.study.enqueue_trial(trial.params, user_attrs={"resume_from": job_dir} if job_dir else {},
                                         skip_if_exists=False)

    def tell(self, trial, ret) -> None:
        from hydra.core.utils import JobStatus
        from optuna.trial import TrialState

        try:
            if ret.status == JobStatus.COMPLETED and "pruned_at" in self.storage.get_trial(trial._trial_id).user_attrs:
                self.study.tell(trial, state=TrialState.PRUNED)  # its value: the last one it reported
                log.info("trial %d pruned", trial.number)
            elif ret.status == JobStatus.COMPLETED:  # a number, or one per objective (objective.metrics)
                value = ret.return_value
                self.study.tell(trial, [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value))
            else:
                self.study.tell(trial, state=TrialState.FAIL)
        except (ValueError, TypeError, RuntimeError) as err:  # finished by another worker that found it stale
            log.warning("trial %d could not be recorded: %s", trial.number, err)


def alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


class FailureBudget:
    """Wraps the launcher: counts failed trials over the whole search; ``check`` stops it past the budget."""

    def __init__(self, launcher, max_failure_rate: float, target: int) -> None:
        self.launcher, self.max_failure_rate, self.target = launcher, max_failure_rate, target
        self.launched = self.failed = 0

    def launch(self, job_overrides, initial_job_idx: int):
        from hydra.core.utils import JobStatus

        returns = self.launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        self.launched += len(returns)
        self.failed += sum(r.status == JobStatus.FAILED for r in returns)
        return returns

    def check(self) -> None:
        if self.failed >= max(self.target, MIN_TRIALS_BEFORE_ABORT) or (
                self.launched >= MIN_TRIALS_BEFORE_ABORT and self.failed / self.launched > self.max_failure_rate):
            # the first test also ends a search whose max_failure_rate=1.0 would otherwise retry forever
            raise RunnerError(
                f"{self.failed} of {self.launched} trials failed (hydra.sweeper.max_failure_rate={self.max_failure_rate}, "
                f"n_trials={self.target}): stopping the search (the failed jobs' logs say why)"
            )
