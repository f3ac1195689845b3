"""K-fold: stratified folds, regression bins, only_fold, aggregation, and the MLflow run -> folds hierarchy."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from runner import job
from runner.cv import aggregate, make_folds, quantile_bins
from runner.data import load_dataset
from runner.errors import RunnerError
from runner.schema import CVConfig, DataConfig
from tests.conftest import shared_data


def assert_within_one_of_ideal(labels: np.ndarray, folds, k: int) -> None:
    counts = np.bincount(labels)
    for _, held in folds:
        held_counts = np.bincount(labels[held], minlength=len(counts))
        assert np.all(np.abs(held_counts - counts / k) < 1), (held_counts, counts / k)


def test_folds_partition_the_data_and_are_stratified():
    labels = np.repeat([0, 1, 2], [50, 30, 7])
    folds = make_folds(labels, CVConfig(folds=5, seed=3))
    assert len(folds) == 5
    held = np.concatenate([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(len(labels)))
    for train, h in folds:
        assert not set(train) & set(h) and len(train) + len(h) == len(labels)
    assert_within_one_of_ideal(labels, folds, 5)


def test_trec_folds_are_within_one_example_of_the_stratified_ideal():
    data = load_dataset(DataConfig(train=str(shared_data("trec", "train.csv"))), need_validation=False)
    assert_within_one_of_ideal(data.train.labels, make_folds(data.train.labels, CVConfig(folds=5)), 5)


def test_same_seed_same_folds_other_seed_other_folds():
    labels = np.arange(60) % 3
    a, b = make_folds(labels, CVConfig(folds=3, seed=1)), make_folds(labels, CVConfig(folds=3, seed=1))
    c = make_folds(labels, CVConfig(folds=3, seed=2))
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, c))


def test_regression_targets_are_stratified_by_quantile_bins():
    rng = np.random.default_rng(0)
    scores = rng.exponential(1.0, size=200)  # skewed: random folds would not spread the tail evenly
    bins = quantile_bins(scores, 4)
    assert np.bincount(bins).tolist() == [50, 50, 50, 50]
    folds = make_folds(scores, CVConfig(folds=5, bins=4))
    assert_within_one_of_ideal(bins, folds, 5)


def test_too_many_folds_for_a_class_is_a_clear_error():
    with pytest.raises(RunnerError, match="cv.folds=5 but a class has only 3 training rows"):
        make_folds(np.repeat([0, 1], [20, 3]), CVConfig(folds=5))


def test_aggregate_mean_and_std():
    stats = aggregate([{"fold": 0, "val/accuracy": 0.8}, {"fold": 1, "val/accuracy": 0.9}])
    assert stats == pytest.approx({"cv/val/accuracy_mean": 0.85, "cv/val/accuracy_std": 0.05})


def children(client, parent_id: str):
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return sorted(runs, key=lambda r: r.data.tags.get("fold", ""))


def test_cv_job_logs_folds_as_children_and_returns_the_logged_mean(make_run):
    run = make_run("cv.folds=3", "mode=head_only", "train.epochs=1", "cv.keep_models=all")
    value = job.execute(run)
    client = mlflow.MlflowClient(tracking_uri=run.cfg.tracking.uri)
    parent = [r for r in client.search_runs([client.get_experiment_by_name("test").experiment_id])
              if "fold" not in r.data.tags][0]
    folds = children(client, parent.info.run_id)
    assert [r.data.tags["fold"] for r in folds] == ["0", "1", "2"]
    assert all(r.info.status == "FINISHED" and "val/accuracy" in r.data.metrics and "test/accuracy" in r.data.metrics
               for r in folds)
    assert parent.data.metrics["cv/val/accuracy_mean"] == pytest.approx(value)
    fold_values = [r.data.metrics["val/accuracy"] for r in folds]
    assert value == pytest.approx(np.mean(fold_values))
    assert parent.data.metrics["cv/val/accuracy_std"] == pytest.approx(np.std(fold_values))
    assert parent.data.metrics["cv/test/accuracy_mean"] == pytest.approx(
        np.mean([r.data.metrics["test/accuracy"] for r in folds]))

    out = Path(run.cfg.output_dir)
    table = pd.read_csv(out / "folds.csv")
    assert table["fold"].tolist() == [0, 1, 2] and table["val/accuracy"].tolist() == pytest.approx(fold_values)
    assert json.loads((out / "metrics.json").read_text())["objective"] == {"metric": "cv/val/accuracy_mean", "value": value}
    assert all((out / "folds" / f"fold-{i}" / "model" / "runner_model.json").exists() for i in range(3))
    assert "folds.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_only_fold_runs_one_fold_and_keep_models_best(make_run):
    run = make_run("cv.folds=4", "cv.only_fold=2", "train.epochs=1")
    job.execute(run)
    client = mlflow.MlflowClient(tracking_uri=run.cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert sorted(r.data.tags.get("fold", "job") for r in runs) == ["2", "job"]
    assert (Path(run.cfg.output_dir) / "model" / "runner_model.json").exists()
    assert not list((Path(run.cfg.output_dir) / "folds").glob("*/model"))  # fold records, no fold model


def test_only_fold_out_of_range(make_run):
    with pytest.raises(RunnerError, match=r"cv.only_fold=7 must be in 0..2"):
        job.execute(make_run("cv.folds=3", "cv.only_fold=7"))
