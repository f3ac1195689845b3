"""Predictions over a loader and the metrics of single-text (and pair) classification."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

METRICS = ("accuracy", "f1_macro", "f1_micro", "precision_macro", "recall_macro", "mcc", "loss")


@torch.no_grad()
def predict(model, loader, accelerator) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels in the dataset's original order (loaders batch by length)."""
    was_training = model.training
    model.eval()
    logits, labels, index = [], [], []
    for batch in loader:
        out = model(batch)
        out, y, i = accelerator.gather_for_metrics((out.float(), batch["labels"], batch["index"]))
        logits.append(out.cpu())
        labels.append(y.cpu())
        index.append(i.cpu())
    model.train(was_training)
    order = torch.cat(index).argsort()
    return torch.cat(logits)[order].numpy(), torch.cat(labels)[order].numpy()


def classification_metrics(logits: np.ndarray, labels: np.ndarray, prefix: str) -> dict[str, float]:
    """accuracy, f1/precision/recall (macro), f1_micro, mcc and cross-entropy loss, keyed ``prefix/name``."""
    from sklearn import metrics as m

    pred = logits.argmax(axis=1)
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    values = {
        "accuracy": m.accuracy_score(labels, pred),
        "f1_macro": m.f1_score(labels, pred, average="macro", zero_division=0),
        "f1_micro": m.f1_score(labels, pred, average="micro", zero_division=0),
        "precision_macro": m.precision_score(labels, pred, average="macro", zero_division=0),
        "recall_macro": m.recall_score(labels, pred, average="macro", zero_division=0),
        "mcc": m.matthews_corrcoef(labels, pred),
        "loss": loss,
    }
    return {f"{prefix}/{k}": float(v) for k, v in values.items()}


def class_report(logits: np.ndarray, labels: np.ndarray, names: list) -> dict:
    """Per-class precision/recall/F1/support and the confusion matrix (rows: true, columns: predicted)."""
    from sklearn import metrics as m

    pred = logits.argmax(axis=1)
    ids = list(range(len(names)))
    report = m.classification_report(
        labels, pred, labels=ids, target_names=[str(n) for n in names], output_dict=True, zero_division=0
    )
    matrix = m.confusion_matrix(labels, pred, labels=ids)
    return {"per_class": report, "confusion_matrix": {"labels": names, "matrix": matrix.tolist()}}
