"""``python -m runner`` as a user runs it: the default job end to end, and data errors without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest

from tests.conftest import ROOT, make_sentences, write_csv


def runner(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_default_job_trains_minilm_on_the_demo_data_and_logs_to_mlflow(tmp_path):
    """The README's main command, with its outputs redirected to a temporary folder."""
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = runner(f"hydra.run.dir={run_dir}", f"tracking.uri={uri}", "train.progress=false")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "objective val/accuracy = " in out.stdout
    value = float(out.stdout.split("objective val/accuracy = ")[1].split()[0])
    assert value >= 0.8  # three easy topics: MiniLM separates them within the default 3 epochs
    # quiet success: after the metrics, only the runner's own lines (no library warnings or INFO notes)
    after = (out.stdout + out.stderr).split("step 15: val/accuracy=")[1].splitlines()[1:]
    assert [line.split(" ")[0] for line in after if line.strip()] == ["model", "objective"], after

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["objective"]["value"] == pytest.approx(value, abs=1e-4)  # printed with 4 decimals
    assert (run_dir / "model" / "encoder" / "model.safetensors").exists()
    assert json.loads((run_dir / "model" / "runner_model.json").read_text())["labels"] == ["food", "sports", "technology"]

    client = mlflow.MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    assert run.info.status == "FINISHED"
    assert {"val/accuracy", "val/f1_macro", "val/mcc", "val/loss", "train/loss"} <= set(run.data.metrics)
    assert run.data.tags["model"] == "minilm" and run.data.tags["data"] == "demo"


def test_a_data_error_is_one_message_and_a_nonzero_exit(tmp_path):
    rows = make_sentences(10, 0)
    rows[6] = ("", "pos")
    path = write_csv(tmp_path / "train.csv", rows)
    out = runner("model=tiny", "data=csv", f"data.train={path}", f"hydra.run.dir={tmp_path / 'run'}",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert out.returncode == 1
    assert f"error: {path}: row 8, column 'text' is empty" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.slow
def test_the_readme_mlflow_ui_command_serves_the_store(tmp_path):
    """`mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db` from the README, on a store a run wrote."""
    import socket
    import time
    import urllib.request

    from runner.tracking import Tracker

    (tmp_path / "outputs").mkdir()
    Tracker(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}", "runner").start("a-run").finish()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["mlflow", "ui", "--backend-store-uri", "sqlite:///outputs/mlflow.db", "--port", str(port)],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body, deadline = None, time.time() + 120
        while body is None and time.time() < deadline:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search",
                                                 data=b'{"max_results": 10}', headers={"Content-Type": "application/json"})
                body = json.loads(urllib.request.urlopen(request, timeout=5).read())
            except OSError:
                time.sleep(2)
        assert body is not None, "mlflow ui did not answer within 2 minutes"
        assert "runner" in {e["name"] for e in body["experiments"]}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_preset_that_is_a_search_runs_without_dash_m():
    """experiment=trec_kfold_search sets hydra.mode: MULTIRUN; Hydra refuses a mode changed in composition, so the
    command line gets the -m it implies (the search itself runs in tests/test_documented_commands.py)."""
    from runner import cli
    from runner.run import CONF_DIR

    assert cli.implied_multirun(["experiment=trec_kfold_search", "cv.folds=5"], CONF_DIR)
    assert not cli.implied_multirun(["-m", "experiment=trec_kfold_search"], CONF_DIR)  # already there
    assert not cli.implied_multirun(["experiment=sst2_peft"], CONF_DIR) and not cli.implied_multirun(["data=csv"], CONF_DIR)


def test_a_pruner_on_the_command_line_replaces_the_presets():
    from runner.cli import replace_whole

    given = ["hparams_search=head_lr", "hydra.sweeper.pruner={_target_: optuna.pruners.ThresholdPruner, lower: 0.5}"]
    assert replace_whole(given) == [given[0], "hydra.sweeper.pruner=null", given[1]]
    assert replace_whole(["hydra.sweeper.pruner=null"]) == ["hydra.sweeper.pruner=null"]
