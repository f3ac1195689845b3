"""Use what you trained, on real data with the real all-MiniLM-L6-v2 (slow): runner.predict and
runner.evaluate reproduce the training run's test metrics for SST-2 classifiers (full, peft) and STS-B
bi- and cross-encoders; the ONNX graph matches PyTorch on 200 dev texts in batches of 1, 7 and 32; int8
keeps SST-2 dev accuracy within a point at a third of the size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from runner.export import export_onnx
from runner.predict import Predictor
from tests.conftest import ROOT, shared_data

pytestmark = pytest.mark.slow


def tool(module: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def train(tmp_path: Path, *overrides: str) -> tuple[Path, dict]:
    tool("runner", f"hydra.run.dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
         f"cache.dir={tmp_path / 'cache'}", "train.progress=false", *overrides)
    return tmp_path / "run" / "model", json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]


def evaluated(model: Path, test: Path) -> dict:
    printed = tool("runner.evaluate", f"model_dir={model}", f"data.test={test}", "progress=false", "tracking=false",
                   f"output_dir={model.parent / 'eval'}")
    return {k: float(v) for k, v in (line.split("=", 1) for line in printed.splitlines())}


def predicted(model: Path, test: Path) -> list[dict]:
    out = model.parent / "pred.jsonl"
    tool("runner.predict", f"model_dir={model}", f"input={test}", f"output={out}", "progress=false")
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["full", "peft"])
def test_sst2_classifier(tmp_path, mode):
    dev = shared_data("sst2", "dev.csv")
    model, logged = train(tmp_path, "data=csv", f"data.train={shared_data('sst2', 'train.csv')}", "data.max_train_samples=2000",
                          f"data.validation={dev}", f"data.test={dev}", f"mode={mode}", "train.epochs=1")
    truth = pd.read_csv(dev)["label"].tolist()
    rows = predicted(model, dev)
    assert np.mean([r["label"] == y for r, y in zip(rows, truth)]) == logged["test/accuracy"]
    again = evaluated(model, dev)
    assert again == pytest.approx({k: v for k, v in logged.items() if k.startswith("test/")}, abs=1e-6)
    if mode == "full":
        check_onnx(model, dev, logged["test/accuracy"])


def check_onnx(model: Path, dev: Path, accuracy: float) -> None:
    export_onnx(model, model / "onnx", quantize="int8")
    texts = [pd.read_csv(dev)["text"].astype(str).tolist()[:200]]
    # the graph is fp32: compared with PyTorch in fp32 (training may have evaluated under bf16 autocast)
    torch_side, onnx_side = Predictor(model, "torch", "fp32"), Predictor(model, "onnx")
    for batch in (1, 7, 32):
        want, got = torch_side.run(texts, batch, embeddings=True), onnx_side.run(texts, batch, embeddings=True)
        assert np.abs(want["head"] - got["head"]).max() <= 1e-4
        assert np.abs(want["columns"][0] - got["columns"][0]).max() <= 1e-4
    size = (model / "onnx" / "model.int8.onnx").stat().st_size / (model / "onnx" / "model.onnx").stat().st_size
    assert size <= 0.35
    all_texts = [pd.read_csv(dev)["text"].astype(str).tolist()]
    int8 = Predictor(model, "onnx-int8")
    labels = [r["label"] for r in int8.records(int8.run(all_texts, 64))]
    int8_accuracy = np.mean([p == y for p, y in zip(labels, pd.read_csv(dev)["label"])])
    assert abs(int8_accuracy - accuracy) <= 0.01, (int8_accuracy, accuracy)


@pytest.mark.parametrize("architecture", ["bi", "cross"])
def test_stsb_pairs(tmp_path, architecture):
    test = shared_data("stsb", "test.csv")
    model, logged = train(tmp_path, "data=stsb", "data.hub=null", f"data.train={shared_data('stsb', 'train.csv')}",
                          "data.max_train_samples=2000", f"data.validation={shared_data('stsb', 'dev.csv')}",
                          f"data.test={test}", f"task.architecture={architecture}", "train.epochs=1", "train.batch_size=16")
    rows = predicted(model, test)
    truth = pd.read_csv(test)["score"].to_numpy()
    from runner.metrics import correlation_metrics

    scores = np.array([r["similarity" if architecture == "bi" else "score"] for r in rows])
    again = correlation_metrics(scores, truth, "test")
    assert again["test/spearman"] == pytest.approx(logged["test/spearman"], abs=1e-5)
    assert evaluated(model, test) == pytest.approx({k: v for k, v in logged.items() if k.startswith("test/")}, abs=1e-6)
