"""Sweeps in MLflow: one parent run per sweep, every job its child, a summary table best first.

``MLflowSweepCallback`` is a Hydra callback (``conf/config.yaml`` lists it), active only under ``-m``:

- before any job starts it creates the MLflow store once (concurrent first-time schema creation on
  SQLite fails) and the sweep's parent run, and writes the parent's id into the sweep folder, where
  every job (in this process, a joblib worker or a cluster node) finds it;
- an Optuna sweep's parent is named by its study (a user attribute), so every worker of a search, and a
  resumed search, reports under the same parent;
- after every job, and at the end, ``summary.csv`` (overrides, status and objective per job, best
  first) is rebuilt from MLflow and logged to the parent: a failed job shows as FAILED and the others
  keep their results, whichever job failed and whether the sweep went on or stopped.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from runner.study_storage import make_storage
from runner.tracking import Tracker, default_uri, prepare_store

log = logging.getLogger("runner")

PARENT_FILE = "mlflow_sweep.json"  # {"run_id": parent run, "sweep_id": sweep key}, read by every job


def sweep_key(config: DictConfig) -> str:
    """What identifies a sweep across restarts: its Optuna study if it has one, else its folder."""
    sweeper = config.hydra.sweeper
    if "optuna" in str(sweeper.get("_target_", "")).lower() and sweeper.get("storage") and sweeper.get("study_name"):
        return f"optuna:{sweeper.storage}:{sweeper.study_name}"
    return str(Path(config.hydra.sweep.dir).resolve())


def sweep_parent(sweep_dir: str | os.PathLike) -> dict[str, str]:
    """The sweep's parent run id and key as the callback wrote them ({} if tracking is off)."""
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text()) if path.exists() else {}


class MLflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.tracker: Tracker | None = None
        self.study: SharedStudy | None = None
        self.finished = False
        self.started: datetime.datetime | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import mlflow

        if not config.tracking.enabled:
            return
        self.started = datetime.datetime.now()  # Optuna's trial times are local and naive too
        uri = config.tracking.uri or default_uri()
        prepare_store(uri, config.tracking.experiment)
        key, sweep_dir = sweep_key(config), Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = Tracker(uri, config.tracking.experiment)
        client = mlflow.MlflowClient(tracking_uri=uri)
        self.study = study_of(config)

        def new_parent() -> str:
            name = Path(config.hydra.sweeper.get("study_name") or sweep_dir.name).name
            self.tracker.start(f"sweep-{name}", tags={"role": "sweep", "sweep_id": key, "sweep_dir": str(sweep_dir.resolve()),
                                                      "objective": config.objective.metric})
            return self.tracker.run_id

        if self.study is not None:  # workers of one study share one parent: the study names it
            parent_id = self.study.parent(new_parent)
            if self.tracker.run_id != parent_id:  # another worker (or an earlier run of this search) made it
                self.tracker.client, self.tracker.run_id = client, parent_id
                client.update_run(parent_id, status="RUNNING")
                log.info("joining sweep run %s (%s)", client.get_run(parent_id).info.run_name, key)
        else:
            new_parent()
        (sweep_dir / PARENT_FILE).write_text(json.dumps({"run_id": self.tracker.run_id, "sweep_id": key}))
        atexit.register(self.close, "FAILED")  # the sweep raised or was interrupted before on_multirun_end

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        parent = sweep_parent(config.hydra.sweep.dir)
        try:
            if not parent or not config.tracking.enabled:
                return
            if job_return.status == JobStatus.FAILED:
                record_failure(config, parent, job_return)
            write_summary(config, parent["run_id"])
        finally:
            compact_failure(config, job_return)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.tracker is None:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        table = write_summary(config, self.tracker.run_id)
        results = sweep_dir / "optimization_results.yaml"  # written by the Optuna sweeper
        study = None
        if results.exists():
            self.tracker.log_artifact(results)
            study = write_trials_table(self.study, sweep_dir / "trials.csv")
            self.tracker.log_artifact(sweep_dir / "trials.csv")
            account = search_account(study, self.started)
            self.tracker.log_metrics(account)
            log.info("search: %s", "  ".join(f"{k}={v:g}" for k, v in account.items()))
            if len(study.directions) > 1:
                table = mark_pareto(config, self.tracker, study, table)
        if table is not None and len(table):
            log_best_model(config, self.tracker, table)
            from runner.report import sweep_report

            for picture in sweep_report(sweep_dir, table, study):
                self.tracker.log_artifact(picture, "report")
        if table is not None and len(table):
            shown = table[["job", "status", "value", "cv_std", *(["pareto"] if "pareto" in table else []), "overrides"]]
            log.info("sweep summary (best first), %s:\n%s", sweep_dir / "summary.csv", shown.to_string(index=False))
        self.close("FINISHED")

    def close(self, status: str) -> None:
        if self.tracker is None or self.finished:
            return
        self.finished = True
        if self.tracker.run_id:
            self.tracker.flush()
        if self.study is not None and self.study.running():
            return  # other workers still run trials of this study: the last one to end closes the parent
        self.tracker.finish(status)


class SharedStudy:
    """The Optuna study of a search, as the sweep callback sees it: it names the MLflow parent run that
    every worker of the search reports under (its user attribute ``mlflow_parent_run_id``)."""

    KEY = "mlflow_parent_run_id"

    def __init__(self, storage, name: str, directions: list[str]) -> None:
        self.storage, self.name, self.directions = storage, name, directions

    def parent(self, create) -> str:
        """The parent run's id: made by ``create()`` in the worker that created the study (creating a study
        is atomic in the storage), read from the study by the others."""
        import optuna

        try:
            study = optuna.create_study(study_name=self.name, storage=self.storage, directions=self.directions)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study, created = optuna.load_study(study_name=self.name, storage=self.storage), False
        if created or self.KEY not in study.user_attrs:
            if not created:  # its creator is making the parent right now, or died first (or an older runner made it)
                for _ in range(30):
                    time.sleep(1)
                    if self.KEY in study.user_attrs:
                        return study.user_attrs[self.KEY]
            study.set_user_attr(self.KEY, create())
        return study.user_attrs[self.KEY]

    def running(self) -> bool:
        import optuna
        from optuna.trial import TrialState

        study = optuna.load_study(study_name=self.name, storage=self.storage)
        return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)))


def study_of(config: DictConfig) -> SharedStudy | None:
    """The Optuna study of an Optuna sweep (None for a grid sweep)."""
    sweeper = config.hydra.sweeper
    if not ("optuna" in str(sweeper.get("_target_", "")).lower() and sweeper.get("storage") and sweeper.get("study_name")):
        return None
    direction = sweeper.get("direction")
    directions = list(direction) if OmegaConf.is_list(direction) else [direction]
    return SharedStudy(make_storage(sweeper.storage), sweeper.study_name,
                       [str(getattr(d, "value", d)).lower().rsplit(".", 1)[-1] for d in directions])


def kill_runs_of(config: DictConfig, job_dir: str) -> None:
    """The MLflow run of a killed trial (found by its folder, under the sweep's parent) and its folds: KILLED."""
    import mlflow

    parent = sweep_parent(config.hydra.sweep.dir)
    if not parent or not config.tracking.enabled:
        return
    client = mlflow.MlflowClient(tracking_uri=config.tracking.uri or default_uri())
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent['run_id']}' "
                              "and attributes.status = 'RUNNING'")
    for run in runs:
        if Path(run.data.tags.get("output_dir", "/nonexistent")).resolve() == Path(job_dir).resolve():
            folds = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = "
                                       f"'{run.info.run_id}' and attributes.status = 'RUNNING'")
            for run_ in [*folds, run]:
                client.set_terminated(run_.info.run_id, status="KILLED")
            log.warning("run %s of the killed trial: marked KILLED", run.info.run_name)


def record_failure(config: DictConfig, parent: dict[str, str], job_return: Any) -> None:
    """A job that failed before opening its MLflow run (a bad value, say) still gets a FAILED child run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=config.tracking.uri or default_uri())
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    job_num = str(config.hydra.job.num)
    existing = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent['run_id']}' and tags.job_num = '{job_num}'",
    )
    if existing:  # the job's own run exists and already says FAILED
        return
    error = str(getattr(job_return, "_return_value", "") or "")[:5000]
    run = client.create_run(experiment.experiment_id, run_name=f"job-{job_num}", tags={
        "mlflow.parentRunId": parent["run_id"], "sweep_id": parent["sweep_id"], "job_num": job_num,
        "overrides": " ".join(config.hydra.overrides.task), "error": error})
    client.set_terminated(run.info.run_id, status="FAILED")


def compact_failure(config: DictConfig, job_return: Any) -> None:
    """A failed sweep job is one line at the end of the sweep (Hydra re-raises it there, after the summary);
    its whole traceback goes to the job's runner.log instead of the console."""
    import traceback

    from hydra.core.utils import JobStatus
    from hydra.errors import CompactHydraException
    from hydra.types import RunMode

    error = getattr(job_return, "_return_value", None)
    if config.hydra.mode != RunMode.MULTIRUN or job_return.status != JobStatus.FAILED or not isinstance(error, BaseException):
        return
    log_file = Path(config.hydra.runtime.output_dir) / "runner.log"
    try:
        with open(log_file, "a", encoding="utf-8") as f:
            f.write("".join(traceback.format_exception(error)))
    except OSError:
        log_file = None
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    where = f" (traceback in {log_file})" if log_file else ""
    job_return._return_value = CompactHydraException(f"job {config.hydra.job.num} failed: {first}{where}")
    for attribute in ("_remote_traceback", "_remote_exception_chain", "_remote_exception_group"):  # Hydra would print them
        if hasattr(job_return, attribute):
            setattr(job_return, attribute, None)


def write_summary(config: DictConfig, parent_id: str):
    """summary.csv in the sweep folder and on the parent run: one row per job, best objective first."""
    import mlflow
    import pandas as pd

    uri = config.tracking.uri or default_uri()
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    rows = []
    for r in runs:
        metric = r.data.tags.get("objective", config.objective.metric)
        value = r.data.metrics.get(f"cv/{metric}_mean", r.data.metrics.get(metric))
        status = r.info.status
        if "pruned_at" in r.data.tags:  # its last reported value (a partial mean over folds, or an evaluation)
            status, value = "PRUNED", float(r.data.tags.get("pruned_value", "nan"))
        rows.append({"job": r.data.tags.get("job_num", ""), "status": status, "objective": metric,
                     "value": value, "cv_std": r.data.metrics.get(f"cv/{metric}_std"),
                     "overrides": r.data.tags.get("overrides", ""), "run_name": r.info.run_name,
                     "run_id": r.info.run_id, "output_dir": r.data.tags.get("output_dir", "")})
    table = pd.DataFrame(rows, columns=["job", "status", "objective", "value", "cv_std", "overrides", "run_name",
                                        "run_id", "output_dir"])
    ascending = getattr(config.objective.direction, "value", config.objective.direction) == "minimize"
    table["pruned"] = table["status"] == "PRUNED"  # after the trials that finished, whatever their partial value
    table = table.sort_values(["pruned", "value"], ascending=[True, ascending], na_position="last", kind="stable")
    table = table.drop(columns="pruned")
    path = Path(config.hydra.sweep.dir) / "summary.csv"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)  # atomic: parallel workers may rewrite it at the same time
    client.log_artifact(parent_id, str(path))
    return table


def mark_pareto(config: DictConfig, tracker: Tracker, study, table):
    """A Pareto search: its front (COMPLETE trials no other dominates, as Optuna computes it) tagged on the
    trials' MLflow runs (``pareto=true``) and the parent (``pareto_trials``), marked in summary.csv, drawn in
    report/pareto.png."""
    from runner.report import pareto_report

    front = sorted(t.number for t in study.best_trials)
    tracker.set_tags({"pareto_trials": ",".join(map(str, front)), "objectives": ",".join(
        config.objective.metrics or [config.objective.metric])})
    table["pareto"] = table["job"].astype(str).isin([str(n) for n in front])
    for run_id in table.loc[table["pareto"], "run_id"]:
        tracker.client.set_tag(run_id, "pareto", "true")
    path = Path(config.hydra.sweep.dir) / "summary.csv"
    table.to_csv(path, index=False)
    tracker.log_artifact(path)
    names = list(config.objective.metrics or [])
    for picture in pareto_report(Path(config.hydra.sweep.dir), study, names):
        tracker.log_artifact(picture, "report")
    log.info("Pareto front (%s): trials %s", ", ".join(names), front)
    return table


def log_best_model(config: DictConfig, tracker: Tracker, table) -> None:
    """``tracking.log_model=auto``: the best finished trial's saved model as its run's MLflow pyfunc model, once
    (several workers of one search end one after another; a trial whose folder is on another machine is left)."""
    if config.tracking.log_model != "auto" or not config.save_model:
        return
    finished = table[table["status"] == "FINISHED"]
    if not len(finished):
        return
    best = finished.iloc[0]
    folder = Path(str(best["output_dir"])) / "model"
    if not (folder / "runner_model.json").exists() or tracker.client.list_artifacts(best["run_id"], "model"):
        return
    from runner.mlflow_model import log_pyfunc

    log_pyfunc(tracker.client, best["run_id"], folder, config.tracking.register)
    log.info("best trial's model logged to MLflow: runs:/%s/model (job %s)", best["run_id"], best["job"])


def search_account(study, since: datetime.datetime | None = None) -> dict[str, float]:
    """What the search spent and what pruning saved, from its trials: ``sweep/trials_pruned``,
    ``sweep/trainings_run`` and ``sweep/trainings_saved`` (folds of k-fold trials, optimizer steps of
    single-split ones, as each trial reported them) and ``sweep/seconds_per_trial``: the wall time from
    ``since`` (this command's sweep start: its bookkeeping between trials included) to its last trial's end,
    per trial it ran."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    run = saved = 0.0
    for trial in done:
        units = trial.user_attrs.get("units") or {}
        total = float(units.get("total", 0))
        ran = float(units.get("run", total)) if trial.state == TrialState.PRUNED else total
        run, saved = run + ran, saved + (total - ran)
    account = {"sweep/trials": float(len(done)),
               "sweep/trials_pruned": float(sum(t.state == TrialState.PRUNED for t in done)),
               "sweep/trainings_run": run, "sweep/trainings_saved": saved}
    # this command's share: a resumed search's earlier sessions (and the time between them) are not its cost
    ours = [t for t in done if t.datetime_start and t.datetime_complete and (since is None or t.datetime_start >= since)]
    if ours:
        start = since or min(t.datetime_start for t in ours)
        account["sweep/seconds_per_trial"] = (max(t.datetime_complete for t in ours) - start).total_seconds() / len(ours)
    return account


def write_trials_table(shared: SharedStudy, path: Path):
    import optuna

    study = optuna.load_study(study_name=shared.name, storage=shared.storage)
    study.trials_dataframe().to_csv(path, index=False)
    return study
