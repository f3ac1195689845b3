"""Files larger than memory (runner/streaming.py): the mapped path gives the same rows, checks and metrics as
the in-memory path, tokenizes in the loader and skips the frozen-feature cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runner import job
from runner.data import load_dataset
from runner.errors import DataError
from runner.schema import DataConfig
from tests.conftest import make_sentences, write_csv


def test_mapped_and_in_memory_reads_agree(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_ARROW_CACHE", str(tmp_path / "arrow"))
    rows = [(f"title {i}", t, y) for i, (t, y) in enumerate(make_sentences(60, 0))]
    path = write_csv(tmp_path / "t.tsv", rows, header=("title", "body", "label"))
    path.write_text(path.read_text().replace(",", "\t"))
    for options in ({}, {"text_field": ["title", "body"]}, {"header": False, "columns": ["a", "b", "c"], "text_field": "b",
                                                            "label_field": 2}):
        if options.get("header") is False:
            path.write_text("\n".join(path.read_text().splitlines()[1:]) + "\n")
        base = dict(train=str(path), text_field=options.pop("text_field", "body"), **options)
        memory = load_dataset(DataConfig(**base, streaming=False))
        mapped = load_dataset(DataConfig(**base, streaming=True))
        assert mapped.train.streamed and not memory.train.streamed
        assert mapped.label_names == memory.label_names
        for split in ("train", "validation"):
            a, b = getattr(memory, split), getattr(mapped, split)
            assert np.array_equal(a.labels, b.labels)
            assert list(a.texts) == list(b.texts)


def test_blank_texts_are_found_column_wise(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_ARROW_CACHE", str(tmp_path / "arrow"))
    path = tmp_path / "t.csv"
    path.write_text("text,label\ngood film,pos\n   ,neg\nbad film,neg\n")
    with pytest.raises(DataError, match=r"row 3, column 'text' is empty"):
        load_dataset(DataConfig(train=str(path), streaming=True))
    with pytest.raises(DataError, match="data.split_field reads the file in memory"):
        load_dataset(DataConfig(train=str(path), streaming=True, split_field="text", split_values={"train": "x"}))


def test_a_mapped_job_trains_to_the_same_metrics(make_run, tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_ARROW_CACHE", str(tmp_path / "arrow"))
    results = []
    for streaming in ("false", "true"):
        run = make_run(f"data.streaming={streaming}", "train.epochs=2", f"output_dir={tmp_path / streaming}")
        job.execute(run)
        results.append(json.loads((Path(run.cfg.output_dir) / "metrics.json").read_text())["metrics"])
    assert results[0] == results[1]


def test_head_only_on_mapped_data_runs_the_encoder_per_batch(make_run, tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_ARROW_CACHE", str(tmp_path / "arrow"))
    run = make_run("data.streaming=true", "mode=head_only", "train.max_steps=3", "pooling=weighted", "pooling.layers=[-2,-1]")
    job.execute(run)
    assert not (tmp_path / "cache").exists()  # no frozen-feature cache for texts that stay on disk


def test_predict_reads_an_input_left_on_disk(make_run, toy_data, tmp_path, monkeypatch):
    """runner.predict on an input above data.streaming_above_mb: the same predictions as read in memory."""
    from runner.predict import PredictConfig, predict

    monkeypatch.setenv("RUNNER_ARROW_CACHE", str(tmp_path / "arrow"))
    run = make_run("train.epochs=1")
    job.execute(run)
    folder = str(Path(run.cfg.output_dir) / "model")
    memory = predict(PredictConfig(model_dir=folder, input=toy_data["test"], progress=False))
    mapped = predict(PredictConfig(model_dir=folder, input=toy_data["test"], progress=False, data={"streaming": True}))
    assert mapped == memory and len(mapped) == 32
