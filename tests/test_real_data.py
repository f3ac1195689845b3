"""The issues' acceptance figures on real data (../shared/data) with the real all-MiniLM-L6-v2.

Slow (minutes on 2 cores): ``nox -s slow``. Skipped with a reason when ../shared/data is absent.
"""

from __future__ import annotations

import json
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
         f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.progress=false", *overrides],
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
