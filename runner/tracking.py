"""MLflow tracking: one run per job (nested runs for folds and trials), ``split/name`` metric keys.

The default store is SQLite at ``outputs/mlflow.db`` with artifacts in ``outputs/mlartifacts``, both
absolute paths so every process of a sweep writes to the same place whatever its working directory.
Only the main process writes; on other ranks the tracker does nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import time
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from runner.errors import RunnerError, TrialPruned
from runner.signals import Interrupted

log = logging.getLogger(__name__)

PARAM_LIMIT = 6000  # MLflow rejects longer param values


def default_uri(root: str | os.PathLike = "outputs") -> str:
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Artifacts beside a local SQLite store (outputs/mlartifacts); None lets a server decide."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


FLUSH_SECONDS = 2.0
PREPARED: dict[tuple[str, str], str] = {}  # (uri, experiment) -> id, once per process (a fold's run needs no check)


def prepare_store(uri: str, experiment: str) -> str:
    """Create the store's schema and the experiment (idempotent); returns the experiment id.

    Concurrent first-time schema creation on SQLite fails (``duplicate column name``), so on a local
    SQLite store the processes take turns through a lock file beside the database.
    """
    if (uri, experiment) in PREPARED:
        return PREPARED[uri, experiment]
    if not uri.startswith("sqlite:///"):
        PREPARED[uri, experiment] = get_or_create_experiment(uri, experiment)
        return PREPARED[uri, experiment]
    path = Path(uri[len("sqlite:///") :])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.parent / f"{path.name}.lock", "a")  # noqa: SIM115  (held for the with block below)
    except OSError as err:
        raise RunnerError(f"tracking store {uri} is not writable ({err.strerror}): set tracking.uri to a "
                          f"writable place, or tracking.enabled=false") from err
    if path.exists() and not os.access(path, os.W_OK):
        raise RunnerError(f"tracking store {uri} is not writable (read-only file): set tracking.uri to a "
                          f"writable place, or tracking.enabled=false")
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        PREPARED[uri, experiment] = get_or_create_experiment(uri, experiment)
        return PREPARED[uri, experiment]


def get_or_create_experiment(uri: str, experiment: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=artifact_root(uri))
    except Exception:  # another process created it between our two calls
        return client.get_experiment_by_name(experiment).experiment_id


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}; lists stay whole (as their string)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def param_text(value: Any) -> str:
    """How a config value reads in MLflow: enums by their value (``pair``, not ``DataType.pair``)."""
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return str([param_text(v) for v in value])
    return str(value)


class TensorBoardMirror:
    """The run's params (a text table) and metrics (scalars, same ``split/name`` keys and steps) as
    TensorBoard event files; nested runs (folds) in subfolders."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise RunnerError("tracking.backends has tensorboard, which is not installed: pip install tensorboard") from err
        self.folder = folder
        self.writer = SummaryWriter(log_dir=str(folder))

    def child(self, name: str) -> TensorBoardMirror:
        return TensorBoardMirror(self.folder / name)

    def params(self, flat: dict[str, str]) -> None:
        rows = ["| param | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in flat.items())]
        self.writer.add_text("params", "\n".join(rows))

    def metrics(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class WandbMirror:
    """A Weights & Biases run per MLflow run (folds grouped under their job); ``WANDB_MODE=offline``
    writes it under <run folder>/wandb without network, to ``wandb sync`` later."""

    def __init__(self, folder: Path, project: str, name: str | None, group: str | None = None) -> None:
        try:
            import wandb
        except ImportError as err:
            raise RunnerError("tracking.backends has wandb, which is not installed: pip install wandb") from err
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.project, self.name = folder, project, name
        try:
            self.run = wandb.init(project=project, name=name, group=group, dir=str(folder), reinit="create_new")
        except Exception as err:  # noqa: BLE001  (wandb's UsageError, CommError, ...): one line, not its traceback
            raise RunnerError(f"wandb could not start a run ({str(err).strip().splitlines()[0][:300]}): check `wandb "
                              f"login`, or set WANDB_MODE=offline") from err

    def child(self, name: str) -> WandbMirror:
        return WandbMirror(self.folder, self.project, name, group=self.name)

    def params(self, flat: dict[str, str]) -> None:
        self.run.config.update(flat, allow_val_change=True)

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def check_backends(backends: list[str]) -> None:
    """What the trackers beside MLflow need, checked before any run opens: W&B installed, and logged in unless
    it runs offline (wandb.init would otherwise stop the job with a traceback, or wait for a key at a prompt)."""
    if "wandb" not in backends:
        return
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        raise RunnerError("tracking.backends has wandb, which is not installed: pip install wandb") from err
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    import netrc

    try:
        logged_in = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
    except (OSError, netrc.NetrcParseError):
        logged_in = None
    if not logged_in:
        raise RunnerError("wandb: no API key: run `wandb login` or set WANDB_MODE=offline (tracking.backends has wandb)")


def make_mirrors(backends: list[str], folder: Path, experiment: str, name: str | None) -> list:
    """The trackers beside MLflow named in ``tracking.backends`` (checked by schema.check_values)."""
    mirrors = []
    if "tensorboard" in backends:
        mirrors.append(TensorBoardMirror(folder / "tensorboard"))
    if "wandb" in backends:
        mirrors.append(WandbMirror(folder, experiment, name))
    return mirrors


class Tracker:
    """A thin MLflow client for one run: params, tags, metrics per step, artifacts, final status; the
    params and metrics also go to the ``mirrors`` (TensorBoard, W&B) named in tracking.backends."""

    def __init__(self, uri: str, experiment: str, enabled: bool = True, mirrors: list | None = None) -> None:
        self.uri, self.experiment, self.enabled = uri, experiment, enabled
        self.mirrors = mirrors or []
        self.client = None
        self.run_id: str | None = None
        self.logged: set[tuple[str, int]] = set()  # (metric, step) already in a continued run: not logged again
        self.params: set[str] = set()  # params already in a continued run (MLflow forbids changing them)
        self.history: dict[str, list[tuple[int, float]]] = {}  # what this process logged (the report's curves)
        # Metrics go to the store in batches: one SQLite write per train/loss log step cost ~15 ms, more than the
        # steps of a head on cached features. Flushed every FLUSH_SECONDS, before checkpoints, reads and the end.
        self.pending: list = []
        self.flushed, self.flush_every = time.monotonic(), FLUSH_SECONDS

    def start(self, run_name: str | None = None, tags: Mapping[str, str] | None = None, parent_id: str | None = None,
              resume_id: str | None = None):
        """Open a new run, or continue ``resume_id`` (a resumed job): same run id, no step logged twice."""
        if not self.enabled:
            return self
        import mlflow

        experiment_id = prepare_store(self.uri, self.experiment)
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        previous = self.existing(resume_id)
        if previous is not None:
            self.run_id = resume_id
            self.client.update_run(resume_id, status="RUNNING")
            self.set_tags(all_tags)
            self.logged = {(key, m.step) for key in previous.data.metrics
                           for m in self.client.get_metric_history(resume_id, key)}
            self.params = set(previous.data.params)
            log.info("continuing MLflow run %s (%s) in %s", previous.info.run_name, resume_id, self.uri)
            return self
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        log.info("MLflow run %s (%s) in %s", run.info.run_name, self.run_id, self.uri)
        return self

    def existing(self, run_id: str | None):
        if not run_id:
            return None
        try:
            run = self.client.get_run(run_id)
        except Exception:  # not in this store (a new store, or another tracking.uri): start a new run
            log.warning("MLflow run %s of this run folder is not in %s: starting a new one", run_id, self.uri)
            return None
        return run if run.info.lifecycle_stage == "active" else None

    def child(self, run_name: str, tags: Mapping[str, str] | None = None, resume_id: str | None = None) -> Tracker:
        """A nested run under this one (folds under a job, trials under a sweep)."""
        mirrors = [m.child(run_name) for m in self.mirrors]
        return Tracker(self.uri, self.experiment, self.enabled, mirrors).start(run_name, tags, self.run_id, resume_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.run_id:
            return
        from mlflow.entities import Param

        items = [Param(k, param_text(v)[:PARAM_LIMIT]) for k, v in flatten(params).items() if k not in self.params]
        for mirror in self.mirrors:
            mirror.params({p.key: p.value for p in items})
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.run_id:
            return
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if not self.run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(v) and (k, step) not in self.logged]
        for mirror in self.mirrors:
            mirror.metrics({m.key: m.value for m in items}, step)
        for m in items:
            self.history.setdefault(m.key, []).append((step, m.value))
        self.pending += items
        if time.monotonic() - self.flushed > self.flush_every or len(self.pending) >= 1000:
            self.flush()

    def flush(self) -> None:
        """Write the buffered metrics (a checkpoint calls this first: what it covers is in the store)."""
        items, self.pending, self.flushed = self.pending, [], time.monotonic()
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        if self.run_id:
            self.client.log_artifact(self.run_id, str(path), folder)

    def metric_history(self) -> dict[str, list[tuple[int, float]]]:
        """Every metric over steps: from MLflow (a resumed run includes what earlier processes logged), or
        what this process logged when tracking is off."""
        if not self.run_id:
            return {k: sorted(v) for k, v in self.history.items()}
        self.flush()
        run = self.client.get_run(self.run_id)
        return {key: sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))
                for key in run.data.metrics}

    @contextlib.contextmanager
    def closing(self):
        """End the run as the block ends: FINISHED, KILLED (a signal, Ctrl-C) or FAILED with the error; a trial
        stopped by the search's pruner is FINISHED with the tag ``pruned_at``."""
        try:
            yield self
        except (Interrupted, KeyboardInterrupt) as stop:
            self.finish("KILLED", str(stop) or "interrupted")
            raise
        except TrialPruned as pruned:  # a first-class outcome of a search: the run did what it was asked
            self.set_tags({"pruned_at": str(pruned.step), "pruned_unit": pruned.unit, "pruned_value": str(pruned.value)})
            self.finish("FINISHED")
            raise
        except BaseException as err:
            self.finish("FAILED", f"{type(err).__name__}: {err}")
            raise
        self.finish("FINISHED")

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        for mirror in self.mirrors:
            mirror.close(status)
        if self.run_id:
            self.flush()
            if error:
                self.set_tags({"error": error[:5000]})
            self.client.set_terminated(self.run_id, status=status)
