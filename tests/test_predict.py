"""runner.predict and runner.evaluate on saved models of every task: predictions reproduce the metrics
logged at training time, evaluation reproduces test/* exactly, bad input is one clear message."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from runner import job
from runner.evaluate import main as evaluate_main
from runner.export import main as export_main
from runner.metrics import classification_metrics, correlation_metrics, multilabel_metrics
from runner.predict import main as predict_main
from tests.conftest import multi_label_rows, triplet_sentence, write_csv


def run_tool(main, args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def trained(make_run, *overrides) -> tuple[Path, dict]:
    run = make_run(*overrides)
    job.execute(run)
    out = Path(run.cfg.output_dir)
    return out / "model", json.loads((out / "metrics.json").read_text())["metrics"]


def pair_file(path: Path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        same, pos = i % 2 == 0, rng.random() < 0.5
        rows.append((triplet_sentence(rng, pos), triplet_sentence(rng, pos if same else not pos), 5.0 if same else 0.0))
    return str(write_csv(path, rows, header=("sentence1", "sentence2", "score")))


def check_evaluate(model: Path, test: str, logged: dict, tmp_path, capsys, *extra) -> None:
    """runner.evaluate prints and logs exactly the training run's test/* numbers."""
    code, out, err = run_tool(evaluate_main, [f"model_dir={model}", f"data.test={test}", "progress=false",
                                              f"output_dir={tmp_path / 'eval'}", *extra], capsys)
    assert code == 0, err
    printed = dict(line.split("=", 1) for line in out.splitlines())
    expected = {k: v for k, v in logged.items() if k.startswith("test/")}
    assert set(printed) == set(expected)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert written == expected  # bit for bit: same task, batches and metric code
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        [(run_id,)] = con.execute("select run_uuid from tags where key='role' and value='evaluation'").fetchall()
        tags = dict(con.execute("select key, value from tags where run_uuid=?", (run_id,)).fetchall())
        metrics = dict(con.execute("select key, value from metrics where run_uuid=?", (run_id,)).fetchall())
    training = json.loads((model.parent / "mlflow_run.json").read_text())["run_id"]
    assert tags["evaluated_run_id"] == training and metrics == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("mode", ["full", "peft"])
def test_classifier_predictions_and_evaluation_match_training(make_run, toy_data, tmp_path, capsys, mode):
    model, logged = trained(make_run, f"mode={mode}", "train.epochs=2")
    out = tmp_path / "pred.jsonl"
    code, _, err = run_tool(predict_main, [f"model_dir={model}", f"input={toy_data['test']}", f"output={out}",
                                           "progress=false"], capsys)
    assert code == 0, err
    rows = predictions(out)
    truth = pd.read_csv(toy_data["test"])["label"].tolist()
    assert len(rows) == len(truth)
    assert np.mean([r["label"] == y for r, y in zip(rows, truth)]) == logged["test/accuracy"]
    names = json.loads((model / "runner_model.json").read_text())["labels"]
    probs = np.array([[r["probabilities"][str(n)] for n in names] for r in rows])
    again = classification_metrics(np.log(probs), np.array([names.index(y) for y in truth]), "test")
    assert again["test/f1_macro"] == pytest.approx(logged["test/f1_macro"], abs=1e-9)
    check_evaluate(model, toy_data["test"], logged, tmp_path, capsys)


def test_cross_encoder_scores_come_back_in_the_original_range(make_run, tmp_path, capsys):
    files = {s: pair_file(tmp_path / f"{s}.csv", n, i) for i, (s, n) in enumerate([("train", 64), ("dev", 24), ("test", 24)])}
    model, logged = trained(make_run, "data=csv", f"data.train={files['train']}", f"data.validation={files['dev']}",
                            f"data.test={files['test']}", "data.type=pair", "task.architecture=cross",
                            "task.target=score", "task.score_range=[0,5]", "data.label_field=score",
                            "objective.metric=val/spearman")
    out = tmp_path / "pred.jsonl"
    code, _, err = run_tool(predict_main, [f"model_dir={model}", f"input={files['test']}", f"output={out}"], capsys)
    assert code == 0, err
    scores = np.array([r["score"] for r in predictions(out)])
    truth = pd.read_csv(files["test"])["score"].to_numpy()
    again = correlation_metrics(scores, truth, "test")
    assert again["test/pearson"] == pytest.approx(logged["test/pearson"], abs=1e-5)
    assert again["test/spearman"] == pytest.approx(logged["test/spearman"], abs=1e-5)
    mse = np.mean((scores / 5 - truth / 5) ** 2)  # training's mse is on the [0, 1] scale
    assert mse == pytest.approx(logged["test/mse"], abs=1e-5)
    check_evaluate(model, files["test"], logged, tmp_path, capsys)
    code, out_text, _ = run_tool(predict_main, [f"model_dir={model}", "text=the film was good", "text_pair=a movie was nice"], capsys)
    assert code == 0 and set(json.loads(out_text.splitlines()[-1])) == {"score"}
    code, _, err = run_tool(predict_main, [f"model_dir={model}", "text=the film was good"], capsys)
    assert code == 1 and "this model scores pairs of texts: give text=... and text_pair=..." in err


def test_bi_encoder_similarities_and_embeddings(make_run, tmp_path, capsys):
    files = {s: pair_file(tmp_path / f"{s}.csv", n, i) for i, (s, n) in enumerate([("train", 64), ("dev", 24), ("test", 24)])}
    model, logged = trained(make_run, "data=csv", f"data.train={files['train']}", f"data.validation={files['dev']}",
                            f"data.test={files['test']}", "data.type=pair", "task.architecture=bi", "task.target=score",
                            "task.score_range=[0,5]", "data.label_field=score", "objective.metric=val/spearman")
    out = tmp_path / "pred.jsonl"
    code, _, err = run_tool(predict_main, [f"model_dir={model}", f"input={files['test']}", f"output={out}"], capsys)
    assert code == 0, err
    rows = predictions(out)
    truth = pd.read_csv(files["test"])["score"].to_numpy()
    again = correlation_metrics(np.array([r["similarity"] for r in rows]), truth, "test")
    assert again["test/spearman"] == pytest.approx(logged["test/spearman"], abs=1e-5)
    a, b = np.array([r["embedding"] for r in rows]), np.array([r["embedding_pair"] for r in rows])
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine == pytest.approx([r["similarity"] for r in rows], abs=1e-5)
    check_evaluate(model, files["test"], logged, tmp_path, capsys)


def test_multi_label_predictions_use_the_saved_threshold(make_run, tmp_path, capsys):
    rng = random.Random(0)
    train, dev, test = (write_csv(tmp_path / f"{n}.csv", multi_label_rows(rng, k))
                        for n, k in (("ml", 96), ("ml_dev", 30), ("ml_test", 30)))
    model, logged = trained(make_run, "data=csv", f"data.train={train}", f"data.validation={dev}", f"data.test={test}",
                            "task.multi_label=true", "task.threshold=0.4", "objective.metric=val/f1_micro",
                            "train.lr=1e-2", "train.epochs=4")
    out = tmp_path / "pred.jsonl"
    code, _, err = run_tool(predict_main, [f"model_dir={model}", f"input={test}", f"output={out}"], capsys)
    assert code == 0, err
    predicted = predictions(out)
    names = ["neg", "pos"]
    hot = np.array([[n in r["labels"] for n in names] for r in predicted], dtype=float)
    truth = np.array([[n in cell.split(",") for n in names] for cell in pd.read_csv(test)["label"]], dtype=float)
    probs = np.array([[r["probabilities"][n] for n in names] for r in predicted])
    assert ((probs > 0.4) == hot.astype(bool)).all()
    again = multilabel_metrics(np.log(probs / (1 - probs)), truth, 0.4, "test")
    assert again["test/f1_micro"] == pytest.approx(logged["test/f1_micro"], abs=1e-9)
    check_evaluate(model, str(test), logged, tmp_path, capsys)


def test_bad_inputs_are_one_clear_message(make_run, toy_data, tmp_path, capsys):
    model, _ = trained(make_run, "train.epochs=1")
    cases = [
        ([f"model_dir={tmp_path / 'missing'}", "text=a"], "no such folder"),
        ([f"model_dir={model}", "text=a", "text_pair=b"], "text_pair= is for pair models"),
        ([f"model_dir={model}", f"input={tmp_path / 'no.csv'}"], "file not found"),
        ([f"model_dir={model}", f"input={write_csv(tmp_path / 'x.csv', [('a', 'b')], header=('sentence', 'y'))}"],
         "no column 'text' (data.text_field)"),
        ([f"model_dir={model}", "text=a", "top_k=0"], "top_k=0 must be at least 1"),
        ([f"model_dir={model}", "text=a", "colour=red"], "Key 'colour' not in 'PredictConfig'"),
        ([f"model_dir={model}", "text=a", "backend=tensorflow"], "backend='tensorflow': choose auto, torch, onnx or onnx-int8"),
        ([f"model_dir={model}", "text=a", "batch_size=0"], "batch_size=0 must be at least 1"),
        ([f"model_dir={model}", "text=a", f"output={write_csv(tmp_path / 'f.csv', [])}/pred.jsonl"],
         "output=" + str(tmp_path / "f.csv") + "/pred.jsonl: cannot write there"),
        ([f"model_dir={model}", "text=a", f"output={tmp_path}"], "is a folder: give a file path"),
    ]
    for args, message in cases:
        code, out, err = run_tool(predict_main, args, capsys)
        assert code == 1 and message in err and "Traceback" not in err, (args, err)
    for main, args, message in (
            (evaluate_main, [f"data.test={toy_data['test']}", f"output_dir={tmp_path / 'f.csv'}/eval"], "cannot write there"),
            (export_main, [f"output={tmp_path / 'f.csv'}/onnx"], "cannot write there"),
            (export_main, [f"check={toy_data['test']}"], "check=FILE measures what int8 costs"),
            (export_main, ["quantize=int8", f"check={toy_data['test']}", f"output={tmp_path / 'elsewhere'}"],
             "leave output unset"),
            (export_main, ["data.text_field=x"], "data.* are the reading options of check=FILE"),
            (predict_main, ["text=a", "backend=onnx"], "does not exist: run python -m runner.export"),
            (predict_main, ["text=a", "backend=torch", "precision=fp16"], "precision='fp16': choose auto"),
            (evaluate_main, [f"data.test={toy_data['test']}", "backend=onnx-int8"], "quantize=int8 first"),
            (predict_main, ["model_dir=models:/nothing", "text=a"], "write models:/<registered name>/<version or latest>")):
        code, _, err = run_tool(main, [f"model_dir={model}", *args], capsys)
        assert code == 1 and message in err and "Traceback" not in err, err
    meta = json.loads((model / "runner_model.json").read_text())
    (model / "runner_model.json").write_text(json.dumps({**meta, "format_version": 99}))
    for main, args in ((predict_main, ["text=a"]), (evaluate_main, [f"data.test={toy_data['test']}"])):
        code, _, err = run_tool(main, [f"model_dir={model}", *args], capsys)
        assert code == 1 and "format version 99; this runner reads versions [1, 2]" in err
    code, _, err = run_tool(predict_main, [f"model_dir={tmp_path}", "text=a"], capsys)
    assert code == 1 and "is not a saved runner model (no runner_model.json)" in err


def test_triplet_model_evaluates_retrieval(make_run, tmp_path, capsys):
    from tests.conftest import write_triplets

    files = {s: write_triplets(tmp_path / f"{s}.jsonl", n, i) for i, (s, n) in enumerate([("train", 64), ("dev", 24), ("test", 24)])}
    model, logged = trained(make_run, "data=csv", "data.type=triplet", f"data.train={files['train']}",
                            f"data.validation={files['dev']}", f"data.test={files['test']}",
                            "objective.metric=val/mrr_at_10")
    check_evaluate(model, files["test"], logged, tmp_path, capsys)
    code, out, err = run_tool(predict_main, [f"model_dir={model}", f"input={files['test']}", "data.text_field=anchor"], capsys)
    assert code == 0, err
    assert len(json.loads(out.splitlines()[0])["embedding"]) == 32


def test_head_only_model_names_its_base_instead_of_copying_it(tmp_path, toy_data, monkeypatch, capsys):
    """A frozen encoder is the packaged MiniLM unchanged: the folder holds the head and a reference."""
    from tests.conftest import run_cli

    monkeypatch.chdir(tmp_path)
    code, out = run_cli(["mode=head_only", "data=csv", f"data.train={toy_data['train']}", f"data.test={toy_data['test']}",
                         "data.validation=null", "train.epochs=1", "hardware=cpu", "train.progress=false",
                         "tracking.enabled=false", f"cache.dir={tmp_path / 'cache'}", "hydra.run.dir=run"], capsys)
    assert code == 0, out
    model = tmp_path / "run" / "model"
    meta = json.loads((model / "runner_model.json").read_text())
    assert meta["encoder"] == "base" and meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) < 2_000_000  # no 88 MB encoder copy
    card = (model / "README.md").read_text()
    assert "sentence-transformers/all-MiniLM-L6-v2" in card and "test/accuracy" in card
    logged = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    code, out, err = run_tool(predict_main, [f"model_dir={model}", f"input={toy_data['test']}", "progress=false"], capsys)
    truth = pd.read_csv(toy_data["test"])["label"].tolist()
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]  # (the Hydra run's log handler)
    assert code == 0 and np.mean([r["label"] == y for r, y in zip(rows, truth)]) == logged["test/accuracy"]
    (model / "runner_model.json").write_text(json.dumps({**meta, "base_weights_sha256": "0" * 64}))
    code, _, err = run_tool(predict_main, [f"model_dir={model}", "text=a fine film"], capsys)
    assert code == 1 and "has other weights than the ones it was trained on" in err


def test_a_bf16_trained_model_predicts_under_the_same_autocast(make_run, toy_data, tmp_path, capsys):
    """precision=bf16 (what precision=auto picks on CPUs with native bf16): training evaluated under bf16
    autocast, so predict and evaluate do too by default and reproduce its metrics; precision=fp32 asks for
    full precision, which gives slightly other scores."""
    from runner.predict import Predictor

    model, logged = trained(make_run, "precision=bf16", "train.epochs=2")
    assert json.loads((model / "runner_model.json").read_text())["precision"] == "bf16"
    out = tmp_path / "pred.jsonl"
    code, _, err = run_tool(predict_main, [f"model_dir={model}", f"input={toy_data['test']}", f"output={out}",
                                           "progress=false"], capsys)
    assert code == 0, err
    names = json.loads((model / "runner_model.json").read_text())["labels"]
    truth = pd.read_csv(toy_data["test"])["label"].tolist()
    probs = np.array([[r["probabilities"][str(n)] for n in names] for r in predictions(out)])
    again = classification_metrics(np.log(probs), np.array([names.index(y) for y in truth]), "test")
    assert again["test/loss"] == pytest.approx(logged["test/loss"], abs=1e-4)  # probabilities are rounded to 1e-6
    check_evaluate(model, toy_data["test"], logged, tmp_path, capsys)
    texts = [pd.read_csv(toy_data["test"])["text"].tolist()]
    bf16, fp32 = Predictor(model).run(texts)["head"], Predictor(model, precision="fp32").run(texts)["head"]
    assert 0 < np.abs(bf16 - fp32).max() < 0.1
