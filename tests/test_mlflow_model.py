"""Each saved model is an MLflow pyfunc model: loaded through MLflow it predicts what runner.predict does;
``tracking.register`` puts it in the Model Registry; ``mlflow models serve`` answers (slow test)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from runner import job
from runner.predict import PredictConfig, predict

TEXTS = ["the film was good", "a plot was awful and poor", "nice"]


@pytest.fixture
def logged_model(make_run):
    run = make_run("tracking.log_model=true", "tracking.register=toy-classifier", "train.epochs=1")
    job.execute(run)
    run_id = json.loads((Path(run.cfg.output_dir) / "mlflow_run.json").read_text())["run_id"]
    return run, run_id


def test_the_pyfunc_model_predicts_what_runner_predict_does(logged_model, tmp_path):
    run, run_id = logged_model
    uri = run.cfg.tracking.uri
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["text"]
    got = model.predict(pd.DataFrame({"text": TEXTS}))
    folder = Path(run.cfg.output_dir) / "model"
    want = [predict(PredictConfig(model_dir=str(folder), text=t, progress=False))[0] for t in TEXTS]
    assert got == want
    assert model.predict(pd.DataFrame({"text": TEXTS}), params={"embeddings": True})[0]["embedding"]
    [version] = mlflow.MlflowClient(uri).search_model_versions("name='toy-classifier'")
    assert version.run_id == run_id
    # runs:/<id> works as runner.predict's model_dir too
    by_id = predict(PredictConfig(model_dir=f"runs:/{run_id}", text=TEXTS[0], tracking_uri=uri, progress=False))
    assert by_id == want[:1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 60) -> None:
    """Until a server started in the background answers ``url``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_runner_predict(logged_model):
    run, run_id = logged_model
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": run.cfg.tracking.uri}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping")
        body = json.dumps({"dataframe_records": [{"text": t} for t in TEXTS]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    folder = Path(run.cfg.output_dir) / "model"
    assert answer == [predict(PredictConfig(model_dir=str(folder), text=t, progress=False))[0] for t in TEXTS]


def test_export_onnx_ships_the_graph_in_the_logged_model_and_the_pyfunc_runs_it(make_run, tmp_path):
    """export_onnx=true: model/onnx is written after saving, so the logged MLflow model carries it and its
    pyfunc answers through ONNX Runtime (backend=auto), with what PyTorch gives in fp32."""
    from runner.predict import Predictor

    run = make_run("tracking.log_model=true", "train.epochs=1", "export_onnx=true")
    job.execute(run)
    folder = Path(run.cfg.output_dir) / "model"
    assert (folder / "onnx" / "model.onnx").exists()
    run_id = json.loads((Path(run.cfg.output_dir) / "mlflow_run.json").read_text())["run_id"]
    mlflow.set_tracking_uri(run.cfg.tracking.uri)
    served = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert served.unwrap_python_model().predictor.backend == "onnx"
    got = served.predict(pd.DataFrame({"text": TEXTS}))
    want = Predictor(folder, "torch", "fp32")
    expected = want.records(want.run([TEXTS]))
    for a, b in zip(got, expected):
        assert a["label"] == b["label"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)


def test_export_onnx_is_refused_for_models_it_cannot_export(make_run):
    from runner.errors import RunnerError

    with pytest.raises(RunnerError, match="export_onnx=true exports a text encoder's graph.*given embeddings"):
        make_run("export_onnx=true", "data.embedding_field=vec")
