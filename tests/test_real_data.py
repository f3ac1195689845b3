"""The issues' acceptance figures on real data (../shared/data) with the real all-MiniLM-L6-v2.

Slow (minutes on 2 cores): ``nox -s slow``. Skipped with a reason when ../shared/data is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from runner.artifact import load_model, predict_labels
from tests.conftest import ROOT, shared_data

pytestmark = pytest.mark.slow


def run_job(tmp_path: Path, *overrides: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "runner", f"hydra.run.dir={tmp_path / 'run'}",
         f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"cache.dir={tmp_path / 'cache'}", "train.progress=false",
         *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]


def sst2(max_rows: int = 4000) -> list[str]:
    return ["data=csv", f"data.train={shared_data('sst2', 'train.csv')}",
            f"data.validation={shared_data('sst2', 'dev.csv')}", f"data.max_train_samples={max_rows}",
            "train.batch_size=32", "model.max_length=128"]


def test_sst2_full_one_epoch(tmp_path):
    assert run_job(tmp_path, *sst2(), "mode=full", "train.epochs=1")["val/accuracy"] >= 0.80


def test_sst2_head_only(tmp_path):
    assert run_job(tmp_path, *sst2(), "mode=head_only", "train.epochs=5")["val/accuracy"] >= 0.76


def test_sst2_peft(tmp_path):
    assert run_job(tmp_path, *sst2(), "mode=peft", "train.epochs=5")["val/accuracy"] >= 0.78


def test_trec_full_and_the_label_map_round_trips(tmp_path):
    test_csv = shared_data("trec", "test.csv")
    metrics = run_job(tmp_path, "data=csv", f"data.train={shared_data('trec', 'train.csv')}",
                      f"data.test={test_csv}", "mode=full", "train.epochs=3")
    assert metrics["test/accuracy"] >= 0.90
    model, tokenizer, meta = load_model(tmp_path / "run" / "model")
    assert meta["labels"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    test = pd.read_csv(test_csv)
    predicted = predict_labels(model, tokenizer, meta, test["text"].tolist())
    accuracy = sum(p == t for p, t in zip(predicted, test["label"])) / len(test)
    assert accuracy == pytest.approx(metrics["test/accuracy"], abs=0.01)  # fp32 here, bf16 autocast in training


def weights_hash(folder: Path) -> str:
    """A hash of every tensor of a saved model, in name order."""
    import hashlib

    model, _, _ = load_model(folder)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("mode", ["full", "peft"])
def test_minilm_killed_with_sigkill_resumes_to_the_same_weights(tmp_path, mode):
    """The real all-MiniLM-L6-v2 on 192 SST-2 rows (12 steps), SIGKILL at step 7, resumed from step 4."""
    import mlflow

    def job(name: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "runner", f"hydra.run.dir={tmp_path / name}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
             f"tracking.experiment={name}", "train.progress=false", *sst2(192), "train.batch_size=16", "train.epochs=1",
             f"mode={mode}", "train.checkpoint_every=4", "train.deterministic=true", "train.eval_every=6",
             "precision=fp32"],
            cwd=ROOT, capture_output=True, text=True, timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})

    whole = job("whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = job("killed", {"RUNNER_CRASH_AT": "step:7"})
    assert killed.returncode == -9
    resumed = job("killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step-00000004" in resumed.stdout
    assert weights_hash(tmp_path / "killed" / "model") == weights_hash(tmp_path / "whole" / "model")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")

    def history(name):
        [run] = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        keys = sorted(k for k in run.data.metrics if k != "train/samples_per_s")
        return [(k, [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)])
                for k in keys]
    assert history("killed") == history("whole")
