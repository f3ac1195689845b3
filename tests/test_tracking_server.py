"""An MLflow tracking server (SQL backend, proxied artifact root) taking four runner jobs logging at once:
every run, metric history and artifact arrives. Slow: a server start and four jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pandas as pd
import pytest

from tests.conftest import ROOT
from tests.test_mlflow_model import free_port, wait_for

pytestmark = pytest.mark.slow


def test_four_jobs_log_at_once_to_a_tracking_server(tmp_path, tiny_overrides):
    port = free_port()
    # the documented command (README, "Beyond one machine"), with SQLite standing in for PostgreSQL
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
                               str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{uri}/health", seconds=120)
        keep = [a for a in tiny_overrides if not a.startswith(("output_dir=", "tracking.uri=", "tracking.log_model="))]
        jobs = [subprocess.Popen([sys.executable, "-m", "runner", *keep, f"tracking.uri={uri}", f"train.seed={k}",
                                  f"tracking.run_name=job{k}", f"hydra.run.dir={tmp_path / f'job{k}'}",
                                  "tracking.log_model=true" if k == 0 else "tracking.log_model=false"],
                                 cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in range(4)]
        outputs = [job.communicate(timeout=600)[0] for job in jobs]
        assert [job.returncode for job in jobs] == [0] * 4, "\n".join(o[-2000:] for o in outputs)

        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name("test")
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        assert sorted(runs) == ["job0", "job1", "job2", "job3"]
        for k in range(4):
            run = runs[f"job{k}"]
            assert run.info.status == "FINISHED"
            logged = json.loads((tmp_path / f"job{k}" / "metrics.json").read_text())["metrics"]
            assert run.data.metrics["val/accuracy"] == pytest.approx(logged["val/accuracy"])
            assert run.data.metrics["test/accuracy"] == pytest.approx(logged["test/accuracy"])
            history = client.get_metric_history(run.info.run_id, "train/loss")
            assert len(history) == len({m.step for m in history}) >= 2  # every logged step, once
            names = {f.path for f in client.list_artifacts(run.info.run_id)}
            assert {"metrics.json", "config.yaml", "runner.log", "report"} <= names
            local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / f"dl{k}"))
            assert json.loads(open(local).read())["metrics"] == json.loads((tmp_path / f"job{k}" / "metrics.json")
                                                                          .read_text())["metrics"]
        mlflow.set_tracking_uri(uri)  # runs:/ URIs resolve through the global tracking URI
        model = mlflow.pyfunc.load_model(f"runs:/{runs['job0'].info.run_id}/model")  # through the server's proxy
        assert len(model.predict(pd.DataFrame({"text": ["good movie", "bad film"]}))) == 2
    finally:
        mlflow.set_tracking_uri(None)
        server.terminate()
        server.wait(timeout=30)
