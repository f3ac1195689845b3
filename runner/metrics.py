"""Metrics from model outputs: classification, multi-label, correlation (scores) and retrieval (triplets)."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def classification_metrics(logits: np.ndarray, labels: np.ndarray, prefix: str, positive: int | None = 1) -> dict[str, float]:
    """accuracy, f1/precision/recall (macro), f1_micro, mcc and cross-entropy loss, keyed ``prefix/name``;
    with two classes also ``f1``, ``precision``, ``recall`` of class ``positive`` (1 unless
    task.positive_label says otherwise, as MRPC reports it)."""
    # From one confusion matrix, as scikit-learn defines each (macro averages over the classes present in
    # the labels or the predictions, 0 where a denominator is 0): its metric functions validate their inputs
    # at ~20 ms a call, more than a head on cached features takes to train an epoch.
    pred = logits.argmax(axis=1)
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    k = logits.shape[1]
    matrix = np.bincount(labels.astype(np.int64) * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)
    tp, truth, predicted = np.diag(matrix), matrix.sum(axis=1), matrix.sum(axis=0)
    ratio = lambda a, b: np.divide(a, b, out=np.zeros_like(a), where=b > 0)  # noqa: E731
    precision, recall, f1 = ratio(tp, predicted), ratio(tp, truth), ratio(2 * tp, truth + predicted)
    present = (truth + predicted) > 0
    n, correct = matrix.sum(), tp.sum()
    covariance = correct * n - truth @ predicted
    spread = (n * n - predicted @ predicted) * (n * n - truth @ truth)
    values = {
        "accuracy": correct / n,
        "f1_macro": f1[present].mean(),
        "f1_micro": correct / n,  # single-label: micro precision = recall = accuracy
        "precision_macro": precision[present].mean(),
        "recall_macro": recall[present].mean(),
        "mcc": covariance / np.sqrt(spread) if spread > 0 else 0.0,
        "loss": loss,
    }
    if k == 2 and positive is not None:
        values.update(f1=f1[positive], precision=precision[positive], recall=recall[positive])
    return {f"{prefix}/{key}": float(v) for key, v in values.items()}


def class_report(logits: np.ndarray, labels: np.ndarray, names: list) -> dict:
    """Per-class precision/recall/F1/support and the confusion matrix (rows: true, columns: predicted): what
    scikit-learn's ``classification_report(labels=all, output_dict=True, zero_division=0)`` gives (tested), from
    one confusion matrix (its input checks alone take ~20 ms, a fold's evaluation here ~1 ms)."""
    k = len(names)
    pred = logits.argmax(axis=1)
    matrix = np.bincount(labels.astype(np.int64) * k + pred, minlength=k * k).reshape(k, k)
    tp, support, predicted = np.diag(matrix).astype(np.float64), matrix.sum(axis=1), matrix.sum(axis=0)
    ratio = lambda a, b: np.divide(a, b, out=np.zeros_like(a), where=b > 0)  # noqa: E731
    columns = {"precision": ratio(tp, predicted.astype(np.float64)), "recall": ratio(tp, support.astype(np.float64)),
               "f1-score": ratio(2 * tp, (support + predicted).astype(np.float64))}
    total = int(support.sum())
    report: dict = {str(name): {**{key: float(v[i]) for key, v in columns.items()}, "support": int(support[i])}
                    for i, name in enumerate(names)}
    report["accuracy"] = float(tp.sum() / total) if total else 0.0
    report["macro avg"] = {**{key: float(v.mean()) for key, v in columns.items()}, "support": total}
    report["weighted avg"] = {**{key: float(v @ support / total) if total else 0.0 for key, v in columns.items()},
                              "support": total}
    return {"per_class": report, "confusion_matrix": {"labels": names, "matrix": matrix.tolist()}}


def multilabel_metrics(logits: np.ndarray, labels: np.ndarray, threshold: float, prefix: str) -> dict[str, float]:
    """Sigmoid > threshold per label: micro/macro F1, micro precision/recall, exact match, BCE loss."""
    from sklearn import metrics as m

    pred = (1 / (1 + np.exp(-logits)) > threshold).astype(int)
    truth = labels.astype(int)
    loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(labels.astype(np.float32)))
    values = {
        "f1_micro": m.f1_score(truth, pred, average="micro", zero_division=0),
        "f1_macro": m.f1_score(truth, pred, average="macro", zero_division=0),
        "precision_micro": m.precision_score(truth, pred, average="micro", zero_division=0),
        "recall_micro": m.recall_score(truth, pred, average="micro", zero_division=0),
        "exact_match": float((pred == truth).all(axis=1).mean()),
        "loss": loss.item(),
    }
    return {f"{prefix}/{k}": float(v) for k, v in values.items()}


def correlation_metrics(predicted: np.ndarray, truth: np.ndarray, prefix: str, mse: bool = False) -> dict[str, float]:
    """Pearson and Spearman correlation of predicted scores (or similarities) with the gold scores."""
    from scipy import stats

    values = {"pearson": stats.pearsonr(predicted, truth)[0], "spearman": stats.spearmanr(predicted, truth)[0]}
    if mse:
        values["mse"] = float(np.mean((predicted - truth) ** 2))
    return {f"{prefix}/{k}": float(v) for k, v in values.items()}


def retrieval_metrics(columns: list[np.ndarray], text_ids: np.ndarray, similarity: str, prefix: str) -> dict[str, float]:
    """Triplet accuracy, and retrieval of each distinct anchor among the distinct positives and negatives.

    ``columns``: anchor, positive (and negative) embeddings in dataset order; ``text_ids``: (columns, n)
    ids equal for equal texts. The relevant documents of an anchor text are the positives paired with it
    anywhere in the set. Metrics: ``triplet_accuracy`` (sim(a, p) > sim(a, n)), ``mrr_at_10``,
    ``recall_at_1``, ``recall_at_10``, ``ndcg_at_10`` (binary relevance).
    """
    from runner.losses import paired_similarity, similarity_matrix

    emb = [torch.from_numpy(c) for c in columns]
    values = {}
    if len(emb) > 2:
        values["triplet_accuracy"] = float((paired_similarity(emb[0], emb[1], similarity) >
                                            paired_similarity(emb[0], emb[2], similarity)).float().mean())
    ids = np.asarray(text_ids)
    queries = {}  # anchor text id -> row of its first occurrence
    for row, q in enumerate(ids[0]):
        queries.setdefault(int(q), row)
    corpus = {}  # document text id -> (column, row)
    for col in range(1, len(emb)):
        for row, d in enumerate(ids[col]):
            corpus.setdefault(int(d), (col, row))
    relevant: dict[int, set[int]] = {}
    for q, p in zip(ids[0], ids[1]):
        relevant.setdefault(int(q), set()).add(int(p))
    doc_ids = list(corpus)
    doc_emb = torch.stack([emb[c][r] for c, r in corpus.values()])
    query_ids = list(queries)
    scores = similarity_matrix(torch.stack([emb[0][r] for r in queries.values()]), doc_emb, similarity)
    top = scores.topk(min(10, len(doc_ids)), dim=1).indices.numpy()
    mrr, r1, r10, ndcg = [], [], [], []
    for qi, q in enumerate(query_ids):
        hits = [doc_ids[j] in relevant[q] for j in top[qi]]
        first = next((rank for rank, hit in enumerate(hits) if hit), None)
        mrr.append(0.0 if first is None else 1.0 / (first + 1))
        r1.append(sum(hits[:1]) / len(relevant[q]))
        r10.append(sum(hits[:10]) / len(relevant[q]))
        dcg = sum(1 / np.log2(rank + 2) for rank, hit in enumerate(hits) if hit)
        ideal = sum(1 / np.log2(rank + 2) for rank in range(min(len(relevant[q]), 10)))
        ndcg.append(dcg / ideal)
    values.update({"mrr_at_10": np.mean(mrr), "recall_at_1": np.mean(r1), "recall_at_10": np.mean(r10), "ndcg_at_10": np.mean(ndcg)})
    return {f"{prefix}/{k}": float(v) for k, v in values.items()}


def image_text_metrics(images: np.ndarray, texts: np.ndarray, text_ids: np.ndarray, prefix: str) -> dict[str, float]:
    """Image -> text and text -> image retrieval over a split's distinct images and distinct captions.

    ``text_ids``: (2, n) ids of each row's image and caption (equal for the same file / the same text). An image's
    relevant captions are every caption it is paired with anywhere in the split, and the other way round (ten
    digit captions: each image has one relevant caption, each caption hundreds of relevant images). The rank of
    a query is 1 + the candidates scoring strictly above its best relevant one. Metrics: ``i2t_recall_at_k``
    and ``t2i_recall_at_k`` (k = 1, 5, 10: a relevant candidate in the top k), ``i2t_mrr``/``t2i_mrr`` and
    ``mean_recall`` (the mean of the six recalls)."""
    ids = np.asarray(text_ids)
    image_ids, image_rows = np.unique(ids[0], return_index=True)
    caption_ids, caption_rows = np.unique(ids[1], return_index=True)
    relevant = np.zeros((len(image_ids), len(caption_ids)), dtype=bool)
    relevant[np.searchsorted(image_ids, ids[0]), np.searchsorted(caption_ids, ids[1])] = True
    a = F.normalize(torch.from_numpy(images[image_rows]).float(), dim=-1)
    b = F.normalize(torch.from_numpy(texts[caption_rows]).float(), dim=-1)
    values = {}
    for name, queries, candidates, rel in (("i2t", a, b, relevant), ("t2i", b, a, relevant.T)):
        ranks = []
        for start in range(0, len(queries), 1024):  # 1,024 query rows at a time: bounded memory on large splits
            sims = (queries[start : start + 1024] @ candidates.T).numpy()
            mask = rel[start : start + 1024]
            best = np.where(mask, sims, -np.inf).max(axis=1)
            ranks.append((sims > best[:, None]).sum(axis=1) + 1)
        rank = np.concatenate(ranks)
        values.update({f"{name}_recall_at_{k}": float((rank <= k).mean()) for k in (1, 5, 10)})
        values[f"{name}_mrr"] = float((1.0 / rank).mean())
    values["mean_recall"] = float(np.mean([v for k, v in values.items() if "_recall_at_" in k]))
    return {f"{prefix}/{k}": v for k, v in values.items()}
