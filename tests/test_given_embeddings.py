"""A head trained on embeddings computed elsewhere: a list column, or .npy / .safetensors files per split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runner import job
from runner.artifact import load_model
from runner.errors import RunnerError


def make_split(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """8-d vectors whose class is the sign of their first coordinate plus their second."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    return vectors, ["up" if v[0] + v[1] > 0 else "down" for v in vectors]


@pytest.fixture
def splits(tmp_path) -> dict[str, tuple[np.ndarray, list[str]]]:
    return {"train": make_split(400, 0), "validation": make_split(40, 1), "test": make_split(40, 2)}


def write_jsonl(tmp_path: Path, splits) -> dict[str, str]:
    paths = {}
    for name, (vectors, labels) in splits.items():
        paths[name] = str(tmp_path / f"{name}.jsonl")
        Path(paths[name]).write_text("\n".join(json.dumps({"vec": v.tolist(), "label": y}) for v, y in zip(vectors, labels)))
    return paths


def write_files(tmp_path: Path, splits) -> tuple[dict[str, str], dict[str, str]]:
    """Label-only csv files, and the vectors in .npy (train, validation) and .safetensors (test)."""
    from safetensors.numpy import save_file

    labels, vectors = {}, {}
    for name, (array, ys) in splits.items():
        labels[name] = str(tmp_path / f"{name}.csv")
        Path(labels[name]).write_text("label\n" + "\n".join(ys) + "\n")
        if name == "test":
            vectors[name] = str(tmp_path / "test.safetensors")
            save_file({"embeddings": array}, vectors[name])
        else:
            vectors[name] = str(tmp_path / f"{name}.npy")
            np.save(vectors[name], array)
    return labels, vectors


def data_args(paths: dict[str, str]) -> list[str]:
    return ["data=csv", *(f"data.{k}={v}" for k, v in paths.items()), "mode=head_only", "train.epochs=20",
            "train.lr=5e-2"]


def metrics_of(run) -> dict:
    return json.loads((Path(run.cfg.output_dir) / "metrics.json").read_text())["metrics"]


def test_a_list_column_trains_a_head_that_reloads_and_predicts_the_same(make_run, tmp_path, splits):
    run = make_run(*data_args(write_jsonl(tmp_path, splits)), "data.embedding_field=vec")
    job.execute(run)
    metrics = metrics_of(run)
    assert metrics["val/accuracy"] >= 0.9 and metrics["test/accuracy"] >= 0.9
    model, tokenizer, meta = load_model(Path(run.cfg.output_dir) / "model")
    assert tokenizer is None and meta["input"] == "embeddings" and meta["dim"] == 8
    vectors, labels = splits["test"]
    with torch.no_grad():
        predicted = [meta["labels"][i] for i in model({"frozen": torch.from_numpy(vectors)}).argmax(-1).tolist()]
    assert np.mean([p == y for p, y in zip(predicted, labels)]) == pytest.approx(metrics["test/accuracy"])


def test_npy_and_safetensors_files_give_the_metrics_of_the_list_column(make_run, tmp_path, splits):
    column = make_run(*data_args(write_jsonl(tmp_path, splits)), "data.embedding_field=vec",
                      f"output_dir={tmp_path / 'column'}")
    job.execute(column)
    labels, vectors = write_files(tmp_path, splits)
    run = make_run(*data_args(labels), *(f"data.{k}_embeddings={v}" for k, v in vectors.items()),
                   f"output_dir={tmp_path / 'files'}")
    job.execute(run)
    assert metrics_of(run) == metrics_of(column)


def test_k_fold_on_given_embeddings(make_run, tmp_path, splits):
    run = make_run(*data_args(write_jsonl(tmp_path, splits)), "data.embedding_field=vec", "cv.folds=3",
                   "data.test=null")
    assert job.execute(run) >= 0.85
    assert {"cv/val/accuracy_mean", "cv/val/accuracy_std"} <= set(metrics_of(run))


def test_given_embeddings_need_head_only(make_run, tmp_path, splits):
    with pytest.raises(RunnerError, match="train a head on given vectors: use mode=head_only"):
        make_run(*data_args(write_jsonl(tmp_path, splits)), "data.embedding_field=vec", "mode=full")


def test_vectors_of_different_lengths_name_the_row(make_run, tmp_path, splits):
    paths = write_jsonl(tmp_path, splits)
    lines = Path(paths["train"]).read_text().splitlines()
    lines[4] = json.dumps({"vec": [1.0, 2.0], "label": "up"})
    Path(paths["train"]).write_text("\n".join(lines))
    with pytest.raises(RunnerError, match=r"train.jsonl: row 5, column 'vec' has \(2,\) numbers where the first row "
                                          r"has \(8,\): every vector needs the same length"):
        job.execute(make_run(*data_args(paths), "data.embedding_field=vec"))


def test_a_vector_file_not_aligned_with_its_rows_is_an_error(make_run, tmp_path, splits):
    labels, vectors = write_files(tmp_path, splits)
    np.save(vectors["validation"], splits["validation"][0][:30])
    with pytest.raises(RunnerError, match=r"validation.npy has 30 rows, data.validation has 40: they must be aligned"):
        job.execute(make_run(*data_args(labels), *(f"data.{k}_embeddings={v}" for k, v in vectors.items())))
