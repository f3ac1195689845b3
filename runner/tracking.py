"""MLflow tracking: one run per job (nested runs for folds and trials), ``split/name`` metric keys.

The default store is SQLite at ``outputs/mlflow.db`` with artifacts in ``outputs/mlartifacts``, both
absolute paths so every process of a sweep writes to the same place whatever its working directory.
Only the main process writes; on other ranks the tracker does nothing.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PARAM_LIMIT = 6000  # MLflow rejects longer param values


def default_uri(root: str | os.PathLike = "outputs") -> str:
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Artifacts beside a local SQLite store (outputs/mlartifacts); None lets a server decide."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def prepare_store(uri: str, experiment: str) -> str:
    """Create the store's schema and the experiment (idempotent); returns the experiment id.

    Call once before parallel jobs start: concurrent first-time schema creation on SQLite fails.
    """
    import mlflow

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
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


class Tracker:
    """A thin MLflow client for one run: params, tags, metrics per step, artifacts, final status."""

    def __init__(self, uri: str, experiment: str, enabled: bool = True) -> None:
        self.uri, self.experiment, self.enabled = uri, experiment, enabled
        self.client = None
        self.run_id: str | None = None

    def start(self, run_name: str | None = None, tags: Mapping[str, str] | None = None, parent_id: str | None = None):
        if not self.enabled:
            return self
        import mlflow

        experiment_id = prepare_store(self.uri, self.experiment)
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        log.info("MLflow run %s (%s) in %s", run.info.run_name, self.run_id, self.uri)
        return self

    def child(self, run_name: str, tags: Mapping[str, str] | None = None) -> Tracker:
        """A nested run under this one (folds under a job, trials under a sweep)."""
        return Tracker(self.uri, self.experiment, self.enabled).start(run_name, tags, parent_id=self.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.run_id:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_LIMIT]) for k, v in flatten(params).items()]
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
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        if self.run_id:
            self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)
