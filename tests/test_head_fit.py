"""The loop for heads on in-memory vectors (runner/head_fit.py) gives the weights and metrics runner.train.fit
gives, and the confusion-matrix metrics equal scikit-learn's."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from runner import head_fit, job


def head_weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(out / "model" / "head.safetensors").items()}


@pytest.mark.parametrize("extra", [[], ["train.early_stopping.patience=2", "train.eval_every=3"], ["pooling=cls"]])
def test_the_vector_loop_trains_the_same_head_as_the_generic_loop(make_run, tmp_path, monkeypatch, extra):
    common = ["mode=head_only", "train.epochs=3", "train.lr=5e-3", "train.head_dropout=0.2", *extra]
    fast = make_run(*common, f"output_dir={tmp_path / 'fast'}", "tracking.experiment=fast")
    used, original = [], head_fit.fit_vectors
    monkeypatch.setattr(head_fit, "fit_vectors", lambda *a, **k: used.append(1) or original(*a, **k))
    job.execute(fast)
    assert used, "the vector loop did not run"
    monkeypatch.setattr(head_fit, "applies", lambda *a, **k: False)  # the generic loop, same run
    job.execute(make_run(*common, f"output_dir={tmp_path / 'generic'}", "tracking.experiment=generic"))
    a, b = head_weights(tmp_path / "fast"), head_weights(tmp_path / "generic")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text())["metrics"] for name in ("fast", "generic")]
    assert metrics[0] == metrics[1]


def test_a_head_on_vectors_checkpoints_only_steps_asked_for_and_resumes(make_run, tmp_path, monkeypatch):
    """Epoch ends are seconds apart here: checkpointed only when the last checkpoint is old. Steps asked for by
    train.checkpoint_every are checkpointed, and a killed run resumes from them to the same weights."""
    from runner import checkpoint


    args = ["mode=head_only", "train.epochs=2", "train.checkpoint_every=4", "train.keep_checkpoints_after_run=true",
            "train.keep_checkpoints=5"]
    job.execute(make_run(*args, f"output_dir={tmp_path / 'whole'}"))
    steps = sorted(p.name for p in (tmp_path / "whole" / "checkpoints").glob("step-*"))
    assert steps == ["step-00000004", "step-00000008", "step-00000012"]  # no epoch-end checkpoint at step 6

    class Kill(Exception):
        pass

    def crash(kind, step):
        if (kind, step) == ("step", 10):
            raise Kill()
    monkeypatch.setattr(checkpoint, "crash_point", crash)
    with pytest.raises(Kill):
        job.execute(make_run(*args, f"output_dir={tmp_path / 'killed'}"))
    monkeypatch.undo()
    job.execute(make_run(*args, f"output_dir={tmp_path / 'killed'}"))
    a, b = head_weights(tmp_path / "whole"), head_weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_classification_metrics_equal_scikit_learn():
    from sklearn import metrics as m

    from runner.metrics import classification_metrics

    rng = np.random.default_rng(0)
    for k in (2, 3, 6):
        for trial in range(60):
            n = int(rng.integers(1, 60))
            labels = rng.integers(0, k, n)
            logits = rng.normal(size=(n, k)).astype(np.float32)
            if trial % 3 == 0:
                logits[:, 0] += 3  # most predictions one class: classes absent from predictions and labels
            pred = logits.argmax(1)
            got = classification_metrics(logits, labels, "v", 1)
            want = {"accuracy": m.accuracy_score(labels, pred),
                    "f1_macro": m.f1_score(labels, pred, average="macro", zero_division=0),
                    "f1_micro": m.f1_score(labels, pred, average="micro", zero_division=0),
                    "precision_macro": m.precision_score(labels, pred, average="macro", zero_division=0),
                    "recall_macro": m.recall_score(labels, pred, average="macro", zero_division=0)}
            with warnings.catch_warnings():  # scikit-learn's note on a single label in both
                warnings.simplefilter("ignore")
                want["mcc"] = m.matthews_corrcoef(labels, pred)
            if k == 2:
                for name, score in (("f1", m.f1_score), ("precision", m.precision_score), ("recall", m.recall_score)):
                    want[name] = score(labels, pred, pos_label=1, average="binary", zero_division=0)
            for key, value in want.items():
                assert got[f"v/{key}"] == pytest.approx(value, abs=1e-12), (k, trial, key)



def test_the_class_report_equals_scikit_learns():
    from sklearn import metrics as m

    from runner.metrics import class_report

    rng = np.random.default_rng(1)
    for k in (2, 3, 6):
        names = [f"c{i}" for i in range(k)]
        for trial in range(40):
            n = int(rng.integers(1, 50))
            labels = rng.integers(0, k, n)
            logits = rng.normal(size=(n, k)).astype(np.float32)
            if trial % 3 == 0:
                logits[:, 0] += 3  # classes absent from predictions, and from labels
            pred = logits.argmax(1)
            got = class_report(logits, labels, names)
            want = m.classification_report(labels, pred, labels=list(range(k)), target_names=names, output_dict=True,
                                           zero_division=0)
            assert got["per_class"].keys() == want.keys()
            for key, value in want.items():
                assert got["per_class"][key] == (pytest.approx(value, abs=1e-12) if isinstance(value, float) else
                                                 {c: pytest.approx(v, abs=1e-12) for c, v in value.items()}), (k, key)
            assert got["confusion_matrix"]["matrix"] == m.confusion_matrix(labels, pred, labels=list(range(k))).tolist()
