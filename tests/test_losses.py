"""Every loss against a hand computation on a tiny batch, and GradCache's gradients against plain MNRL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from runner import losses as L


def close(value: torch.Tensor, expected: float) -> None:
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


LOGITS = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
LABELS = torch.tensor([0, 1, 1])


def log_softmax(row, k):
    return row[k] - math.log(sum(math.exp(v) for v in row))


def nll(i):
    return -log_softmax(LOGITS[i].tolist(), int(LABELS[i]))


def test_cross_entropy_plain_weighted_and_smoothed():
    close(L.CrossEntropy().compute(LOGITS, LABELS), sum(nll(i) for i in range(3)) / 3)

    balanced = L.CrossEntropy(class_weights="balanced")
    balanced.prepare(np.array([0, 1, 1]))  # weights n / (k * count): 3/2 and 3/4
    w = [1.5, 0.75, 0.75]
    close(balanced.compute(LOGITS, LABELS), sum(w[i] * nll(i) for i in range(3)) / sum(w))

    eps = 0.1
    smooth = [(1 - eps) * nll(i) - eps * sum(log_softmax(LOGITS[i].tolist(), k) for k in range(2)) / 2 for i in range(3)]
    close(L.CrossEntropy(label_smoothing=eps).compute(LOGITS, LABELS), sum(smooth) / 3)


def test_focal_reduces_to_cross_entropy_at_gamma_zero_and_weights_easy_examples_down():
    close(L.Focal(gamma=0).compute(LOGITS, LABELS), L.CrossEntropy().compute(LOGITS, LABELS).item())
    p = [math.exp(-nll(i)) for i in range(3)]
    close(L.Focal(gamma=2).compute(LOGITS, LABELS), sum((1 - p[i]) ** 2 * nll(i) for i in range(3)) / 3)
    alpha = L.Focal(gamma=2, alpha=[0.25, 0.75])
    alpha.prepare(None)
    a = [0.25, 0.75, 0.75]
    close(alpha.compute(LOGITS, LABELS), sum(a[i] * (1 - p[i]) ** 2 * nll(i) for i in range(3)) / 3)


def test_binary_cross_entropy_and_mse():
    logits, labels = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    sig = 1 / (1 + math.exp(-2.0))
    close(L.BinaryCrossEntropy().compute(logits, labels), (-math.log(0.5) - math.log(1 - sig)) / 2)
    close(L.MeanSquaredError().compute(torch.tensor([[0.5], [1.0]]), torch.tensor([0.0, 0.0])), (0.25 + 1) / 2)


A = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
B = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])  # cosines: 1, 1/sqrt(2), 0


def test_cosent_penalises_only_wrongly_ordered_pairs():
    labels = torch.tensor([0.2, 1.0, 0.5])  # pair 1 should rank first, then 2, then 0
    s = [1.0 * 20, 2**-0.5 * 20, 0.0]
    wrong = [(1, 0), (1, 2), (2, 0)]  # (should be higher, lower): terms exp(s_low - s_high)
    close(L.CoSENT(scale=20).compute(A, B, labels), math.log(1 + sum(math.exp(s[lo] - s[hi]) for hi, lo in wrong)))


def test_cosine_mse_and_contrastive():
    labels = torch.tensor([1.0, 0.0, 0.0])
    cos = [1.0, 2**-0.5, 0.0]
    close(L.CosineMSE().compute(A, B, labels), sum((c - y) ** 2 for c, y in zip(cos, [1, 0, 0])) / 3)
    d = [1 - c for c in cos]
    m = 0.5
    expected = 0.5 * (d[0] ** 2 + max(0, m - d[1]) ** 2 + max(0, m - d[2]) ** 2) / 3
    close(L.Contrastive(margin=m).compute(A, B, labels), expected)


def unit(*rows):
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.norm(dim=1, keepdim=True)


def test_mnrl_in_batch_negatives_and_duplicate_masking():
    a = unit([1, 0.2], [0.1, 1])
    p = unit([1, 0], [0, 1])
    n = unit([1, 1], [-1, 1])
    scale = 20
    cand = torch.cat([p, n])
    scores = (a @ cand.T * scale).tolist()
    expected = sum(-scores[i][i] + math.log(sum(math.exp(v) for v in scores[i])) for i in range(2)) / 2
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])  # all texts distinct
    close(L.MultipleNegativesRanking(scale=scale).compute([a, p, n], ids), expected)

    # positive 1 has the same text as positive 0: for anchor 0 it is no negative, so it is left out
    dup = torch.tensor([[0, 1], [2, 2], [4, 5]])
    kept = [[0, 2, 3], [0, 1, 2, 3]]
    expected = sum(-scores[i][i] + math.log(sum(math.exp(scores[i][j]) for j in kept[i])) for i in range(2)) / 2
    close(L.MultipleNegativesRanking(scale=scale).compute([a, p, n], dup), expected)

    # both rows have the same anchor text: each row's positive is a positive of the other, not a negative
    same_anchor = torch.tensor([[0, 0], [2, 3], [4, 5]])
    kept = [[0, 2, 3], [1, 2, 3]]
    expected = sum(-scores[i][i] + math.log(sum(math.exp(scores[i][j]) for j in kept[i])) for i in range(2)) / 2
    close(L.MultipleNegativesRanking(scale=scale).compute([a, p, n], same_anchor), expected)


def test_triplet_margin_cosine_and_euclidean():
    a, p, n = unit([1, 0]), unit([1, 1]), unit([0, 1])
    d_ap, d_an = 1 - 2**-0.5, 1.0
    close(L.Triplet(margin=0.5).compute(a, p, n), max(0, d_ap - d_an + 0.5))
    e_ap, e_an = float((a - p).norm()), float((a - n).norm())
    close(L.Triplet(margin=1.0, distance="euclidean").compute(a, p, n), max(0, e_ap - e_an + 1.0))


def tiny_embedder(dropout: float = 0.0):
    from transformers import BertConfig, BertModel

    from runner.model import TextModel
    from runner.pooling import MeanPooling

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return TextModel(BertModel(config), MeanPooling(), None)


def triplet_batch(n: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    features = []
    for _ in range(3):
        lengths = torch.randint(3, 9, (n,), generator=g)
        ids = torch.randint(5, 50, (n, 9), generator=g)
        mask = (torch.arange(9)[None, :] < lengths[:, None]).long()
        features.append({"input_ids": ids * mask, "attention_mask": mask})
    return {"features": features, "index": torch.arange(n), "text_ids": torch.arange(3 * n).reshape(3, n)}


def gradients(model, loss, batch, scale: float = 1.0) -> dict[str, torch.Tensor]:
    model.zero_grad()
    value = loss(model, batch)
    (value * scale).backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradcache_gives_the_same_loss_and_gradients_as_mnrl():
    model = tiny_embedder().eval()
    batch = triplet_batch()
    plain_value, plain = gradients(model, L.MultipleNegativesRanking(), batch)
    cached_value, cached = gradients(model, L.CachedMultipleNegativesRanking(mini_batch_size=5), batch)
    torch.testing.assert_close(cached_value, plain_value)
    assert plain.keys() == cached.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-4, atol=1e-6)
    # gradient accumulation scales the loss before backward: the cached gradients follow
    _, halved = gradients(model, L.CachedMultipleNegativesRanking(mini_batch_size=5), batch, scale=0.5)
    for name in plain:
        torch.testing.assert_close(halved[name], plain[name] * 0.5, rtol=1e-4, atol=1e-6)


def test_gradcache_replays_dropout_so_its_gradients_are_exact_for_its_own_forward():
    """With dropout on, the second (graph) pass sees the same masks as the first: the gradients equal
    those of MNRL computed on the very embeddings of the first pass."""
    model = tiny_embedder(dropout=0.3).train()
    batch = triplet_batch()
    loss = L.CachedMultipleNegativesRanking(mini_batch_size=4)
    torch.manual_seed(5)
    _, cached = gradients(model, loss, batch)
    # reference: MNRL embedding each mini-batch in the same order under the same RNG stream
    torch.manual_seed(5)
    model.zero_grad()
    columns = [torch.cat([model(p) for p in loss.chunks(f)]) for f in batch["features"]]
    L.MultipleNegativesRanking().compute(columns, batch["text_ids"]).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(cached[name], p.grad, rtol=1e-4, atol=1e-6)
