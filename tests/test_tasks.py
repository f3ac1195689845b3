"""Pairs, triplets, multi-label, scores, focal/balanced, distillation and export, end to end on the tiny model."""

from __future__ import annotations

import random
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from runner import artifact, job
from runner.errors import RunnerError
from runner.metrics import correlation_metrics, multilabel_metrics, retrieval_metrics
from tests.conftest import make_sentences, multi_label_rows, triplet_sentence, write_csv, write_triplets

sentence = triplet_sentence

@pytest.fixture
def pair_files(tmp_path):
    """Pairs scored 0-5: 5 when both texts have the same sentiment, 0 otherwise."""
    def write(name, n, seed):
        rng = random.Random(seed)
        rows = []
        for i in range(n):
            same, pos = i % 2 == 0, rng.random() < 0.5
            rows.append((sentence(rng, pos), sentence(rng, pos if same else not pos), 5.0 if same else 0.0, int(same)))
        return str(write_csv(tmp_path / f"{name}.csv", rows, header=("sentence1", "sentence2", "score", "label")))
    return {"train": write("train", 64, 0), "validation": write("dev", 24, 1)}


@pytest.fixture
def triplet_files(tmp_path):
    return {"train": write_triplets(tmp_path / "train.jsonl", 64, 0),
            "validation": write_triplets(tmp_path / "dev.jsonl", 24, 1)}


def pair_overrides(files, *extra):
    return ["data=csv", f"data.train={files['train']}", f"data.validation={files['validation']}", "data.test=null",
            "data.type=pair", *extra]


def history(run, key):
    client = mlflow.MlflowClient(tracking_uri=run.cfg.tracking.uri)
    [mlrun] = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    return mlrun, client.get_metric_history(mlrun.info.run_id, key)


def test_cross_encoder_pair_classification(make_run, pair_files):
    run = make_run(*pair_overrides(pair_files, "task.architecture=cross", "objective.metric=val/f1"))
    value = job.execute(run)
    mlrun, _ = history(run, "val/accuracy")
    assert {"val/accuracy", "val/f1", "val/f1_macro"} <= set(mlrun.data.metrics) and 0 <= value <= 1
    model, tokenizer, meta = artifact.load_model(Path(run.cfg.output_dir) / "model")
    assert meta["head"]["out_features"] == 2 and meta["task"] == "Classify"


def test_cross_encoder_regression_on_scores_loads_as_a_cross_encoder(make_run, pair_files):
    from sentence_transformers import CrossEncoder

    run = make_run(*pair_overrides(pair_files, "task.architecture=cross", "task.target=score", "task.score_range=[0,5]",
                                   "data.label_field=score", "objective.metric=val/spearman", "pooling=cls"))
    job.execute(run)
    mlrun, _ = history(run, "val/spearman")
    assert {"val/pearson", "val/spearman", "val/mse"} <= set(mlrun.data.metrics)
    folder = Path(run.cfg.output_dir) / "model"
    model, tokenizer, meta = artifact.load_model(folder)
    pairs = [("the film was good", "a movie was nice"), ("the plot was awful", "a film was great")]
    with torch.no_grad():
        ours = model(tokenizer([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt"))[:, 0]
    theirs = CrossEncoder(str(folder), device="cpu").predict(pairs, convert_to_tensor=True)
    torch.testing.assert_close(theirs.float(), ours, atol=1e-5, rtol=0)


def test_bi_encoder_cosent_logs_step_zero_and_exports_a_sentence_transformer(make_run, pair_files):
    from sentence_transformers import SentenceTransformer

    run = make_run(*pair_overrides(pair_files, "task.architecture=bi", "task.target=score", "task.score_range=[0,5]",
                                   "data.label_field=score", "objective.metric=val/spearman", "mode=full",
                                   "pooling.normalize=true", "train.lr=1e-2"))
    job.execute(run)
    _, spearman = history(run, "val/spearman")
    assert spearman[0].step == 0 and len(spearman) >= 2  # the untrained value, then training's
    folder = Path(run.cfg.output_dir) / "model"
    model, tokenizer, meta = artifact.load_model(folder)
    assert meta["sentence_transformers"] and meta["head"] is None
    texts = ["the film was good", "a plot was awful", "the movie was nice and the plot was poor"]
    ours = artifact.embed_texts(model, tokenizer, meta, texts)
    theirs = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert torch.allclose(ours.norm(dim=1), torch.ones(3))  # pooling.normalize is part of the export


@pytest.mark.parametrize("loss", ["cosine_mse", "contrastive"])
def test_other_pair_losses_run(make_run, pair_files, loss):
    label = "score" if loss == "cosine_mse" else "label"
    run = make_run(*pair_overrides(pair_files, "task.architecture=bi", "task.target=score", f"data.label_field={label}",
                                   f"loss={loss}", "objective.metric=val/spearman", "train.epochs=1",
                                   *(["task.score_range=[0,5]"] if label == "score" else [])))
    assert np.isfinite(job.execute(run))


@pytest.mark.parametrize("loss", ["mnrl", "cached_mnrl", "triplet"])
def test_triplet_losses_train_and_report_retrieval(make_run, triplet_files, loss):
    run = make_run("data=csv", "data.type=triplet", f"data.train={triplet_files['train']}",
                   f"data.validation={triplet_files['validation']}", "data.test=null", f"loss={loss}",
                   "loss.mini_batch_size=4" if loss == "cached_mnrl" else "train.seed=42",
                   "objective.metric=val/mrr_at_10", "train.lr=1e-2")
    job.execute(run)
    mlrun, mrr = history(run, "val/mrr_at_10")
    assert mrr[0].step == 0
    assert {"val/triplet_accuracy", "val/recall_at_1", "val/recall_at_10", "val/ndcg_at_10"} <= set(mlrun.data.metrics)


def test_multi_label_trains_and_reports_micro_and_macro_f1(make_run, tmp_path):
    rng = random.Random(0)
    train = write_csv(tmp_path / "ml.csv", multi_label_rows(rng, 96))
    dev = write_csv(tmp_path / "ml_dev.csv", multi_label_rows(rng, 30))
    run = make_run("data=csv", f"data.train={train}", f"data.validation={dev}", "data.test=null",
                   "task.multi_label=true", "objective.metric=val/f1_micro", "train.lr=1e-2", "train.epochs=8")
    value = job.execute(run)
    mlrun, _ = history(run, "val/f1_micro")
    assert {"val/f1_micro", "val/f1_macro", "val/exact_match"} <= set(mlrun.data.metrics)
    assert value >= 0.8


def test_focal_loss_with_balanced_class_weights(make_run, tmp_path):
    rows = make_sentences(90, 0, labels=("pos", "pos", "neg"))  # 2:1 imbalance
    train = write_csv(tmp_path / "imb.csv", rows)
    run = make_run("data=csv", f"data.train={train}", "data.validation=null", "data.test=null",
                   "loss=focal", "loss.alpha=balanced", "loss.gamma=2", "train.lr=1e-2", "train.epochs=6")
    assert job.execute(run) >= 0.8


def test_distillation_from_self_logs_the_drift_term(make_run):
    run = make_run("distill.teacher=self", "distill.alpha=0.5", "train.log_every=1", "train.epochs=1")
    job.execute(run)
    _, drift = history(run, "train/distill")
    assert drift and drift[0].value >= 0
    assert any(m.value > 0 for m in drift)  # the encoder moves away from its start


def test_a_loss_for_the_wrong_outputs_is_a_clear_error(make_run):
    with pytest.raises(RunnerError, match="loss CoSENT works on pair outputs, but this run .* trains on logits"):
        make_run("loss=cosent")


def test_retrieval_metrics_by_hand():
    # two queries (anchors); the documents are p0, p1, n0, n1
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    p = np.array([[0.9, 0.1], [0.6, 0.8]])
    n = np.array([[0.0, 1.0], [-1.0, 0.0]])
    ids = np.array([[0, 1], [2, 3], [4, 5]])
    m = retrieval_metrics([a, p, n], ids, "cosine", "test")
    # query 0 ranks p0 first (mrr 1); query 1 ranks n0 (cos 1) above p1 (cos 0.8): mrr 1/2
    assert m["test/mrr_at_10"] == pytest.approx(0.75)
    assert m["test/recall_at_1"] == pytest.approx(0.5) and m["test/recall_at_10"] == pytest.approx(1.0)
    assert m["test/ndcg_at_10"] == pytest.approx((1 + 1 / np.log2(3)) / 2)
    assert m["test/triplet_accuracy"] == pytest.approx(1.0)  # cos(a,p) > cos(a,n) for both


def test_correlation_and_multilabel_metrics():
    c = correlation_metrics(np.array([0.1, 0.4, 0.3]), np.array([1.0, 3.0, 2.0]), "val", mse=False)
    assert c["val/spearman"] == pytest.approx(1.0) and 0.9 < c["val/pearson"] < 1.0
    logits = np.array([[5.0, -5.0], [5.0, 5.0], [-5.0, -5.0]])
    labels = np.array([[1, 0], [1, 1], [0, 1]], dtype=np.float32)
    m = multilabel_metrics(logits, labels, 0.5, "val")
    assert m["val/f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 0 + 1))  # tp 3, fp 0, fn 1
    assert m["val/f1_macro"] == pytest.approx((1.0 + 2 / 3) / 2) and m["val/exact_match"] == pytest.approx(2 / 3)


def test_batches_are_length_grouped_for_heads_and_random_for_in_batch_losses(make_run, pair_files, monkeypatch):
    from runner import batching

    seen = []
    real = batching.make_loader
    monkeypatch.setattr(batching, "make_loader", lambda *a, **kw: seen.append(kw.get("group_by_length")) or real(*a, **kw))
    common = ("task.target=score", "task.score_range=[0,5]", "data.label_field=score", "objective.metric=val/spearman",
              "train.max_steps=1", "save_model=false")
    for architecture, grouped in (("cross", True), ("bi", False)):
        seen.clear()
        run = make_run(*pair_overrides(pair_files, f"task.architecture={architecture}", *common), "overwrite=true")
        job.execute(run)
        assert seen[0] is grouped  # the training loader; evaluation loaders are always sorted by length
    seen.clear()
    job.execute(make_run(*pair_overrides(pair_files, "task.architecture=bi", "train.group_by_length=true", *common),
                         "overwrite=true"))
    assert seen[0] is True
