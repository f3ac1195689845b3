"""Folds trained together (runner/fold_heads.py) give what folds trained one by one give, and keep each
fold's own MLflow run, logs and result."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from runner import fold_heads, job


def fold_heads_of(out: Path, folds: int) -> list[dict[str, torch.Tensor]]:
    return [load_file(out / "folds" / f"fold-{i}" / "model" / "head.safetensors") for i in range(folds)]


@pytest.mark.parametrize("extra", [[], ["loss=ce", "loss.class_weights=balanced", "train.max_grad_norm=0.05"]])
def test_folds_trained_together_equal_folds_trained_one_by_one(make_run, tmp_path, monkeypatch, extra):
    """Without dropout nothing random differs: same samplers, same initial weights, same updates (per-fold
    clipping, class weights prepared on each fold's own labels)."""
    common = ["mode=head_only", "cv.folds=3", "cv.keep_models=all", "train.epochs=3", "train.head_lr=5e-3",
              "train.head_dropout=0", "train.eval_every=2", *extra]
    used, original = [], fold_heads.fit_folds
    monkeypatch.setattr(fold_heads, "fit_folds", lambda *a, **k: used.append(1) or original(*a, **k))
    together = job.execute(make_run(*common, f"output_dir={tmp_path / 'together'}", "tracking.experiment=together"))
    assert used, "the folds were not trained together"
    monkeypatch.setattr(fold_heads, "applies", lambda *a, **k: False)
    alone = job.execute(make_run(*common, f"output_dir={tmp_path / 'alone'}", "tracking.experiment=alone"))
    assert together == pytest.approx(alone, abs=1e-6)
    for a, b in zip(fold_heads_of(tmp_path / "together", 3), fold_heads_of(tmp_path / "alone", 3)):
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    tables = [pd.read_csv(tmp_path / name / "folds.csv") for name in ("together", "alone")]
    assert np.allclose(tables[0].to_numpy(), tables[1].to_numpy(), atol=1e-4)

    client = mlflow.MlflowClient(tracking_uri=make_run().cfg.tracking.uri)
    curves = {}
    for name in ("together", "alone"):
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], "tags.fold = '1'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        curves[name] = {key: [(m.step, round(m.value, 4)) for m in client.get_metric_history(runs[0].info.run_id, key)]
                        for key in ("val/accuracy", "train/loss")}
    assert curves["together"] == curves["alone"]  # every evaluation and loss window, per fold


def other_task(kind: str, tmp_path: Path) -> list[str]:
    import random

    from tests.conftest import multi_label_rows, write_csv
    from tests.test_predict import pair_file

    if kind == "multi_label":
        train = write_csv(tmp_path / "ml.csv", multi_label_rows(random.Random(0), 96))
        return [f"data.train={train}", "data.validation=null", "data.test=null", "task.multi_label=true",
                "objective.metric=val/f1_micro"]
    train = pair_file(tmp_path / "pairs.csv", 96, 0)
    return [f"data.train={train}", "data.validation=null", "data.test=null", "data.type=pair",
            "task.architecture=cross", "task.target=score", "task.score_range=[0,5]", "data.label_field=score",
            "objective.metric=val/spearman"]


@pytest.mark.parametrize("kind", ["multi_label", "cross_encoder_scores"])
def test_other_head_tasks_train_together_as_one_by_one(make_run, tmp_path, monkeypatch, kind):
    common = ["mode=head_only", "cv.folds=3", "train.epochs=2", "train.head_lr=5e-3", "train.head_dropout=0",
              *other_task(kind, tmp_path)]
    used, original = [], fold_heads.fit_folds
    monkeypatch.setattr(fold_heads, "fit_folds", lambda *a, **k: used.append(1) or original(*a, **k))
    together = job.execute(make_run(*common, f"output_dir={tmp_path / 'together'}"))
    monkeypatch.setattr(fold_heads, "applies", lambda *a, **k: False)
    alone = job.execute(make_run(*common, f"output_dir={tmp_path / 'alone'}"))
    assert used and together == pytest.approx(alone, abs=1e-5)


def test_dropout_folds_are_seeded_logged_per_fold_and_the_best_is_saved(make_run, tmp_path):
    args = ["mode=head_only", "cv.folds=3", "train.epochs=3", "train.head_dropout=0.3", "train.log_every=0"]
    values = [job.execute(make_run(*args, f"output_dir={tmp_path / name}", f"tracking.experiment={name}"))
              for name in ("a", "b")]
    assert values[0] == values[1]  # the dropout masks come from the job's seed
    out = tmp_path / "a"
    table = pd.read_csv(out / "folds.csv")
    best = int(table["fold"][table["val/accuracy"].idxmax()])
    card = (out / "model" / "README.md").read_text()  # the model card lists the saved fold's metrics
    assert f"| `val/accuracy` | {table['val/accuracy'].max():.4f} |" in card
    assert not (out / "folds" / f"fold-{best}" / "model").exists()  # keep_models=best: one model, the job's

    client = mlflow.MlflowClient(tracking_uri=make_run().cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("a").experiment_id], "tags.fold != ''")
    assert sorted(r.data.tags["fold"] for r in runs) == ["0", "1", "2"]
    for run in runs:
        evals = [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")]
        logged = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert evals == [0, 4, 8, 12] and logged == [4, 8, 12]  # train.log_every=0: a loss at each evaluation


def test_folds_train_one_by_one_where_together_would_change_the_training(make_run, tmp_path, monkeypatch):
    """Early stopping (each fold stops on its own) is trained fold by fold, as are folds with unequal numbers
    of batches per epoch (5 folds of 96 rows: 76 or 77 training rows, 4 or 5 batches of 19)."""
    calls = []
    monkeypatch.setattr(fold_heads, "fit_folds", lambda *a, **k: calls.append(1))
    job.execute(make_run("mode=head_only", "cv.folds=3", "train.epochs=2", "train.early_stopping.patience=1"))
    job.execute(make_run("mode=head_only", "cv.folds=5", "train.epochs=1", "train.batch_size=19",
                         f"output_dir={tmp_path / 'uneven'}"))
    assert calls == []


def test_the_numpy_dropout_keeps_one_minus_p_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(200, 500)
    for p in (0.0, 0.25, 0.5):
        out = fold_heads.Dropout(p)(x.clone())  # in place: a copy of its own
        kept = (out > 0).float().mean().item()
        assert kept == pytest.approx(1 - p, abs=0.01)
        assert out[out > 0].unique().tolist() == pytest.approx([1 / (1 - p)])
    torch.manual_seed(0)
    first = fold_heads.Dropout(0.5)(x.clone())
    torch.manual_seed(0)
    assert torch.equal(first, fold_heads.Dropout(0.5)(x.clone()))


def test_the_closed_form_cross_entropy_gradient_is_autograds():
    from torch.nn import functional as F

    torch.manual_seed(0)
    logits, labels, sizes = torch.randn(3, 5, 4), torch.randint(0, 4, (3, 5)), [5, 3, 5]  # fold 1: 2 padding rows
    loss, grad = fold_heads.cross_entropy_gradient(logits, labels, sizes)
    leaf = logits.clone().requires_grad_()
    want = torch.stack([F.cross_entropy(leaf[f, :n], labels[f, :n]) for f, n in enumerate(sizes)])
    want.sum().backward()
    assert torch.allclose(loss, want.detach(), atol=1e-6) and torch.allclose(grad, leaf.grad, atol=1e-6)
    assert grad[1, 3:].abs().sum() == 0
