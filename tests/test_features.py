"""A frozen encoder runs once per text: every pooling from the kept layout equals the pooling of the
hidden states; the disk cache changes no metric and serves later jobs and trials."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from runner import job
from runner.features import DiskCache
from runner.pooling import (
    ClsPooling,
    LastTokenPooling,
    MaxPooling,
    MeanPooling,
    WeightedLayerPooling,
    frozen_layout,
)


@pytest.mark.parametrize("pooling_cls", [MeanPooling, ClsPooling, MaxPooling, LastTokenPooling, WeightedLayerPooling])
@pytest.mark.parametrize("layers", [[-1], [-3, -2, -1]])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_every_pooling_from_the_frozen_layout_equals_pooling_the_hidden_states(pooling_cls, layers, normalize, side):
    torch.manual_seed(0)
    hidden = [torch.randn(4, 7, 16) for _ in range(5)]
    lengths = torch.tensor([7, 3, 5, 1])
    positions = torch.arange(7)[None, :]
    mask = (positions < lengths[:, None]) if side == "right" else (positions >= 7 - lengths[:, None])
    pooling = pooling_cls(layers=layers, normalize=normalize)
    if isinstance(pooling, WeightedLayerPooling):
        pooling.layer_logits.data = torch.randn(len(layers))
    expected = pooling(hidden, mask.long())
    got = pooling.from_frozen(frozen_layout(hidden, mask.long(), layers))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def head_only(make_run, tmp_path, name, *extra):
    return make_run("mode=head_only", "train.epochs=3", "train.lr=5e-3", f"output_dir={tmp_path / name}",
                    f"tracking.experiment={name}", f"cache.dir={tmp_path / 'cache'}", *extra)


def metrics_of(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / name / "metrics.json").read_text())["metrics"]


def cache_metrics(uri: str, experiment: str) -> dict:
    client = mlflow.MlflowClient(tracking_uri=uri)
    [run] = [r for r in client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
             if "fold" not in r.data.tags]
    return {k: v for k, v in run.data.metrics.items() if k.startswith("cache/")}


@pytest.mark.parametrize("extra", [[], ["cv.folds=3", "data.test=null"]], ids=["single", "k-fold"])
def test_the_disk_cache_changes_no_metric_and_serves_the_next_job(make_run, tmp_path, caplog, toy_data, extra):
    caplog.set_level("INFO", logger="runner")
    job.execute(head_only(make_run, tmp_path, "nocache", "cache.enabled=false", *extra))
    first = head_only(make_run, tmp_path, "first", *extra)
    job.execute(first)
    job.execute(head_only(make_run, tmp_path, "second", *extra))
    assert metrics_of(tmp_path, "nocache") == metrics_of(tmp_path, "first") == metrics_of(tmp_path, "second")
    uri = first.cfg.tracking.uri
    import pandas as pd

    files = [toy_data["train"]] if extra else [toy_data["train"], toy_data["validation"], toy_data["test"]]
    texts = len(set(pd.concat([pd.read_csv(f) for f in files])["text"]))
    assert cache_metrics(uri, "first") == {"cache/hits": 0, "cache/misses": texts}
    assert cache_metrics(uri, "second") == {"cache/hits": texts, "cache/misses": 0}
    encoded = [r.message for r in caplog.records if r.message.startswith("frozen encoder:")]
    assert len(encoded) == 3  # once per job, not per epoch or fold
    assert len(list((tmp_path / "cache").glob("frozen-*.db"))) == 1


def test_another_max_length_is_another_cache(make_run, tmp_path):
    job.execute(head_only(make_run, tmp_path, "a"))
    job.execute(head_only(make_run, tmp_path, "b", "model.max_length=8"))
    assert cache_metrics(make_run().cfg.tracking.uri, "b")["cache/hits"] == 0
    assert len(list((tmp_path / "cache").glob("frozen-*.db"))) == 2


def test_the_saved_head_only_model_predicts_what_training_measured(make_run, tmp_path):
    """The saved model runs its encoder on tokens again: it must agree with the cached vectors."""
    from runner.artifact import load_model, predict_labels
    from tests.conftest import make_sentences

    job.execute(head_only(make_run, tmp_path, "saved", "data.test=null"))
    model, tokenizer, meta = load_model(tmp_path / "saved" / "model")
    rows = make_sentences(32, 1)  # the validation file of the toy data
    predicted = predict_labels(model, tokenizer, meta, [t for t, _ in rows])
    accuracy = float(np.mean([p == y for p, (_, y) in zip(predicted, rows)]))
    assert accuracy == pytest.approx(metrics_of(tmp_path, "saved")["val/accuracy"])


def test_concurrent_writers_share_one_cache_file(tmp_path):
    rng = np.random.default_rng(0)
    items = {f"k{i}": rng.normal(size=(4, 8)).astype(np.float32) for i in range(200)}

    def write(keys):
        cache = DiskCache(tmp_path, "s", (4, 8))
        cache.put({k: items[k] for k in keys})
        cache.close()
    threads = [threading.Thread(target=write, args=(list(items)[i::2] + list(items)[:50],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keys = [*items, "absent"]
    out = torch.zeros((len(keys), 4, 8))
    assert DiskCache(tmp_path, "s", (4, 8)).fill(keys, out) == list(range(200))
    assert all(np.array_equal(out[i].numpy(), items[k]) for i, k in enumerate(keys[:-1]))
