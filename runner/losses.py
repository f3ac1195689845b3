"""Losses, one class per concept, chosen by ``_target_`` in ``conf/loss/`` (or the task's default).

Every loss is called as ``loss(model, batch) -> scalar`` by the training loop. Three families, by what
the model gives them:

- **logits** (a head model: single texts, cross-encoder pairs): :class:`CrossEntropy`, :class:`Focal`,
  :class:`BinaryCrossEntropy` (multi-label), :class:`MeanSquaredError` (scores);
- **pair embeddings** (bi-encoder pairs, ``labels`` = score or 0/1): :class:`CoSENT`,
  :class:`CosineMSE`, :class:`Contrastive`;
- **triplet embeddings** (anchor, positive, optional hard negative): :class:`MultipleNegativesRanking`
  (InfoNCE with in-batch negatives), :class:`CachedMultipleNegativesRanking` (the same with GradCache),
  :class:`Triplet`;
- **image and caption embeddings** (a dual encoder, runner/dual.py): :class:`ImageTextContrastive` (CLIP's
  softmax or SigLIP's sigmoid, with the model's learnable temperature), :class:`CachedImageTextContrastive`.

Each family's ``compute`` takes plain tensors, so the formulas are tested by hand on tiny batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from runner.distributed import gather_ids, gather_rows
from runner.errors import RunnerError

FAMILIES = ("logits", "pair", "triplet", "image_text")


class Loss(nn.Module):
    family = ""
    terms: dict[str, torch.Tensor]  # extra values to log (e.g. the distillation term), set by forward

    def prepare(self, train_labels: np.ndarray | None) -> None:
        """Called once with the training targets before training (class weights need them)."""


# ----------------------------------------------------------------------------------------------- logits


class LogitLoss(Loss):
    family = "logits"

    def forward(self, model, batch) -> torch.Tensor:
        return self.compute(model(batch["features"][0]), batch["labels"])

    def compute(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def class_weights(spec: str | Sequence[float] | None, labels: np.ndarray | None) -> torch.Tensor | None:
    """``balanced``: n_samples / (n_classes * count_c), as scikit-learn; a list: taken as given."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "balanced":
            raise ValueError(f"loss.class_weights={spec!r}: use 'balanced' or a list with one weight per class")
        counts = np.bincount(labels)
        return torch.tensor(len(labels) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)
    return torch.tensor(list(spec), dtype=torch.float32)


class CrossEntropy(LogitLoss):
    """Softmax cross-entropy, optionally with label smoothing and class weights.

    Example: ``python -m runner loss=ce loss.label_smoothing=0.1 loss.class_weights=balanced``
    """

    def __init__(self, label_smoothing: float = 0.0, class_weights: str | Sequence[float] | None = None) -> None:
        super().__init__()
        self.label_smoothing, self.class_weights_spec = label_smoothing, class_weights
        self.register_buffer("weight", None)

    def prepare(self, train_labels: np.ndarray | None) -> None:
        self.weight = class_weights(self.class_weights_spec, train_labels)

    def compute(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(logits.device, logits.dtype)
        return F.cross_entropy(logits, labels, weight=weight, label_smoothing=self.label_smoothing)


class Focal(LogitLoss):
    """Focal loss (Lin et al. 2017): ``-alpha_y (1 - p_y)^gamma log p_y``, averaged over the batch.

    Down-weights easy examples; ``alpha`` is a class weight (a list, ``balanced``, or null for none).
    Example: ``python -m runner loss=focal loss.gamma=2 loss.alpha=balanced``
    """

    def __init__(self, gamma: float = 2.0, alpha: str | Sequence[float] | None = None) -> None:
        super().__init__()
        self.gamma, self.alpha_spec = gamma, alpha
        self.register_buffer("alpha", None)

    def prepare(self, train_labels: np.ndarray | None) -> None:
        self.alpha = class_weights(self.alpha_spec, train_labels)

    def compute(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        if self.alpha is not None:
            loss = loss * self.alpha.to(loss.device)[labels]
        return loss.mean()


class BinaryCrossEntropy(LogitLoss):
    """Multi-label: an independent sigmoid per label, ``labels`` multi-hot. ``pos_weight`` per label."""

    def __init__(self, pos_weight: Sequence[float] | None = None) -> None:
        super().__init__()
        self.pos_weight = None if pos_weight is None else torch.tensor(list(pos_weight))

    def compute(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pos_weight)


class MeanSquaredError(LogitLoss):
    """Regression on one output: ``mean((y_hat - y)^2)`` (scores scaled by ``task.score_range``)."""

    def compute(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())


# ------------------------------------------------------------------------------------------------ pairs


def similarity_matrix(a: torch.Tensor, b: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """(n, m) similarities of every row of ``a`` with every row of ``b``."""
    if kind == "cosine":
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return a @ b.T


def paired_similarity(a: torch.Tensor, b: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """(n,) similarity of row i of ``a`` with row i of ``b``."""
    return F.cosine_similarity(a, b, dim=-1) if kind == "cosine" else (a * b).sum(-1)


class PairLoss(Loss):
    family = "pair"

    def __init__(self, similarity: str = "cosine") -> None:
        super().__init__()
        self.similarity = similarity

    def forward(self, model, batch) -> torch.Tensor:
        a, b = (model(f) for f in batch["features"])
        return self.compute(a.float(), b.float(), batch["labels"].float())

    def compute(self, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CoSENT(PairLoss):
    """CoSENT (Su 2022): for every two pairs where pair i should be more similar than pair j
    (``label_i > label_j``), penalise ``s_j > s_i``:
    ``log(1 + sum_{label_i > label_j} exp(scale * (s_j - s_i)))``, with ``s`` the pairs' cosines.
    Only the order of the scores matters, which is what Spearman correlation measures.
    Example: ``python -m runner data=stsb task.architecture=bi loss=cosent``
    """

    def __init__(self, scale: float = 20.0, similarity: str = "cosine", gather_across_ranks: bool = True) -> None:
        super().__init__(similarity)
        self.scale, self.gather = scale, gather_across_ranks

    def compute(self, a, b, labels):
        s = paired_similarity(a, b, self.similarity) * self.scale
        if self.gather:  # every process ranks all pairs of the job's batch (see MultipleNegativesRanking.compute)
            s, labels = gather_rows(s), gather_ids(labels)
        diff = s[None, :] - s[:, None]  # diff[i, j] = s_j - s_i
        diff = diff[labels[:, None] > labels[None, :]]  # only where pair i should rank above pair j
        return torch.logsumexp(torch.cat([torch.zeros(1, device=s.device), diff]), dim=0)


class CosineMSE(PairLoss):
    """``mean((cos(a, b) - label)^2)``: labels in [0, 1] (set ``task.score_range`` for other scales)."""

    def compute(self, a, b, labels):
        return F.mse_loss(paired_similarity(a, b, self.similarity), labels)


class Contrastive(PairLoss):
    """Contrastive loss (Hadsell et al. 2006) on cosine distance ``d = 1 - cos``, labels 0/1:
    ``mean(y * d^2 + (1 - y) * relu(margin - d)^2) / 2``.
    """

    def __init__(self, margin: float = 0.5) -> None:
        super().__init__("cosine")
        self.margin = margin

    def compute(self, a, b, labels):
        d = 1 - F.cosine_similarity(a, b, dim=-1)
        return 0.5 * (labels * d.pow(2) + (1 - labels) * F.relu(self.margin - d).pow(2)).mean()


# --------------------------------------------------------------------------------------------- triplets


class TripletLoss(Loss):
    family = "triplet"

    def embed(self, model, batch) -> list[torch.Tensor]:
        return [model(f).float() for f in batch["features"]]


class MultipleNegativesRanking(TripletLoss):
    """InfoNCE with in-batch negatives (MNRL): anchor i must pick its positive among every positive and
    hard negative in the batch: ``CE(scale * cos(a_i, [p_1..p_n, n_1..n_n]), target = i)``.

    Duplicates are masked out instead of being counted as negatives: a candidate whose text equals
    anchor i's positive, and the positive of any other row whose anchor text equals anchor i's (data
    built by grouping on the anchor, as SNLI triplets are, repeats anchors within a batch).
    Example: ``python -m runner data=snli_triplets loss=mnrl loss.scale=20``
    """

    def __init__(self, scale: float = 20.0, similarity: str = "cosine", gather_across_ranks: bool = True) -> None:
        super().__init__()
        self.scale, self.similarity, self.gather = scale, similarity, gather_across_ranks

    def forward(self, model, batch) -> torch.Tensor:
        return self.compute(self.embed(model, batch), batch["text_ids"])

    def compute(self, columns: Sequence[torch.Tensor], text_ids: torch.Tensor) -> torch.Tensor:
        """With N processes and ``gather``, every process computes the loss of the whole job batch from the
        gathered embeddings. Gradients flow back to each process's own rows summed over the N (identical)
        losses, and DDP averages over N: exactly the gradient of one process with the N x B batch."""
        if self.gather:
            columns, text_ids = [gather_rows(c) for c in columns], gather_ids(text_ids)
        anchor, candidates = columns[0], torch.cat(list(columns[1:]))
        scores = similarity_matrix(anchor, candidates, self.similarity) * self.scale  # (n, n * (k - 1))
        n = anchor.size(0)
        target = torch.arange(n, device=anchor.device)
        ids = text_ids.to(anchor.device)
        candidate_ids = ids[1:].reshape(-1)  # positives then negatives
        duplicate = candidate_ids[None, :] == ids[1][:, None]
        duplicate[:, :n] |= ids[0][None, :] == ids[0][:, None]  # positives of rows with the same anchor
        duplicate[target, target] = False  # the true positive stays
        return F.cross_entropy(scores.masked_fill(duplicate, float("-inf")), target)


class GradCache:
    """GradCache (Gao et al. 2021) for any loss on embedding columns: the same loss and gradients as on the whole
    batch, with activation memory bounded by ``mini_batch_size``.

    1. embed every column in mini-batches without building a graph (RNG state kept per mini-batch);
    2. compute the loss on those embeddings and its gradient with respect to them (and to ``extra`` parameters the
       loss itself uses: a learnable temperature);
    3. when the loop calls ``backward``, a hook re-embeds each mini-batch with a graph, under the same RNG state
       (same dropout), and back-propagates the cached embedding gradients through it.
    """

    mini_batch_size: int

    def chunks(self, features: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        n = next(iter(features.values())).size(0)  # token ids or pixels: every input has one row per example
        return [{k: v[i : i + self.mini_batch_size] for k, v in features.items()} for i in range(0, n, self.mini_batch_size)]

    def cached(self, model, batch, loss_of, extra: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """``loss_of(columns)`` on the whole batch, computed as above; ``extra``: parameters it reads directly."""
        pieces = [self.chunks(f) for f in batch["features"]]
        states, columns = [], []
        with torch.no_grad():
            for column in pieces:
                outs = []
                for piece in column:
                    states.append(RandomState())
                    outs.append(model(piece).float())
                columns.append(torch.cat(outs).requires_grad_())
        with torch.enable_grad():
            loss = loss_of(columns)
            grads = torch.autograd.grad(loss, [*columns, *extra])
        # gathered, each process's rows already carry the gradient summed over the N processes' losses
        # (see MultipleNegativesRanking.compute), which DDP's average over N turns back into the job's gradient
        out = loss.detach().requires_grad_()
        embedding_grads, extra_grads = grads[: len(columns)], grads[len(columns):]

        def backward(grad_output):
            for param, grad in zip(extra, extra_grads):
                param.grad = grad * grad_output if param.grad is None else param.grad + grad * grad_output
            self.backward_through_model(model, pieces, states, embedding_grads, grad_output)

        out.register_hook(backward)
        return out

    def backward_through_model(self, model, pieces, states, embedding_grads, grad_output) -> None:
        k, last = 0, sum(len(column) for column in pieces) - 1
        for column, grads in zip(pieces, embedding_grads):
            start = 0
            for piece in column:
                # under DDP gradients are averaged once, with the last mini-batch's backward
                quiet = model.no_sync() if k < last and hasattr(model, "no_sync") else contextlib.nullcontext()
                with states[k], torch.enable_grad(), quiet:  # backward hooks run with grad mode off
                    emb = model(piece).float()
                    end = start + emb.size(0)
                    emb.backward(grads[start:end] * grad_output)
                start, k = end, k + 1


class CachedMultipleNegativesRanking(GradCache, MultipleNegativesRanking):
    """MNRL with GradCache (:class:`GradCache`): large batches at the memory of ``mini_batch_size``.
    Example: ``python -m runner data=snli_triplets loss=cached_mnrl train.batch_size=128 loss.mini_batch_size=16``
    """

    def __init__(self, scale: float = 20.0, similarity: str = "cosine", mini_batch_size: int = 32,
                 gather_across_ranks: bool = True) -> None:
        super().__init__(scale, similarity, gather_across_ranks)
        self.mini_batch_size = mini_batch_size

    def forward(self, model, batch) -> torch.Tensor:
        return self.cached(model, batch, lambda columns: self.compute(columns, batch["text_ids"]))


class RandomState:
    """Captures the CPU (and CUDA) RNG state now; ``with state:`` replays it, then restores the present."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def __enter__(self) -> None:
        self.saved = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if self.cuda is not None else None)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

    def __exit__(self, *exc) -> None:
        torch.set_rng_state(self.saved[0])
        if self.saved[1] is not None:
            torch.cuda.set_rng_state_all(self.saved[1])


class Triplet(TripletLoss):
    """Triplet margin loss: ``mean(relu(d(a, p) - d(a, n) + margin))``, d cosine (1 - cos) or euclidean."""

    def __init__(self, margin: float = 0.5, distance: str = "cosine") -> None:
        super().__init__()
        if distance not in ("cosine", "euclidean"):
            raise ValueError(f"loss.distance={distance!r}: use cosine or euclidean")
        self.margin, self.distance = margin, distance

    def forward(self, model, batch) -> torch.Tensor:
        columns = self.embed(model, batch)
        if len(columns) < 3:
            raise ValueError("loss=triplet needs a negative column: set data.negative_field")
        return self.compute(*columns[:3])

    def dist(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1 - F.cosine_similarity(x, y, dim=-1) if self.distance == "cosine" else (x - y).norm(dim=-1)

    def compute(self, anchor, positive, negative):
        return F.relu(self.dist(anchor, positive) - self.dist(anchor, negative) + self.margin).mean()


class ImageTextContrastive(Loss):
    """Images against captions with in-batch negatives, the temperature (and SigLIP's bias) learned with the model.

    ``softmax`` (CLIP): the mean of the two cross-entropies, image -> its caption among the batch's captions and
    caption -> its image, on ``exp(t) * cos``. ``sigmoid`` (SigLIP): every image-caption pair of the batch is a
    binary decision, ``-sum(log sigmoid(z_ij * (exp(t) * cos_ij + b))) / n`` with z = 1 for a match, -1 else.
    Repeats are not negatives: a caption equal to image i's caption (ten digit captions in a batch of 32) and
    the same image file count as matches (sigmoid) or are masked out (softmax), as MNRL masks duplicate texts.
    With N processes, negatives come from the whole job batch (gathered, as :class:`MultipleNegativesRanking`).
    Example: ``python -m runner model=clip data=csv data.type=image_text data.train=pairs.csv loss=clip``
    """

    family = "image_text"
    MAX_SCALE = 100.0  # CLIP clips the learned temperature's scale at 100: beyond it training turns unstable

    def __init__(self, kind: str = "auto", gather_across_ranks: bool = True) -> None:
        super().__init__()
        if kind not in ("auto", "softmax", "sigmoid"):
            raise ValueError(f"loss.kind={kind!r}: use auto, softmax (CLIP) or sigmoid (SigLIP)")
        self.kind, self.gather = kind, gather_across_ranks

    def forward(self, model, batch) -> torch.Tensor:
        scale, bias = temperature(model)
        images, texts = [model(f).float() for f in batch["features"]]
        return self.compute(images, texts, batch["text_ids"], scale, bias)

    def resolved(self, bias: torch.Tensor | None) -> str:
        if self.kind == "auto":
            return "sigmoid" if bias is not None else "softmax"
        if self.kind == "sigmoid" and bias is None:
            raise RunnerError("loss=siglip needs a model with a learnable logit bias (SigLIP): use loss=clip for this "
                              "model")
        return self.kind

    def compute(self, images: torch.Tensor, texts: torch.Tensor, text_ids: torch.Tensor, log_scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        kind = self.resolved(bias)
        if self.gather:
            images, texts, text_ids = gather_rows(images), gather_rows(texts), gather_ids(text_ids)
        logits = similarity_matrix(images, texts) * log_scale.float().exp().clamp(max=self.MAX_SCALE)
        ids = text_ids.to(logits.device)
        match = (ids[1][:, None] == ids[1][None, :]) | (ids[0][:, None] == ids[0][None, :])  # incl. the diagonal
        if kind == "sigmoid":
            signs = match.float() * 2 - 1
            return -F.logsigmoid(signs * (logits + bias.float())).sum() / logits.size(0)
        target = torch.arange(logits.size(0), device=logits.device)
        repeat = match.clone()
        repeat[target, target] = False
        logits = logits.masked_fill(repeat, float("-inf"))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class CachedImageTextContrastive(GradCache, ImageTextContrastive):
    """:class:`ImageTextContrastive` with GradCache through both towers: batches of ``train.batch_size`` at the
    activation memory of ``loss.mini_batch_size`` images and captions.
    Example: ``python -m runner model=lit ... loss=cached_clip train.batch_size=256 loss.mini_batch_size=32``"""

    def __init__(self, kind: str = "auto", gather_across_ranks: bool = True, mini_batch_size: int = 32) -> None:
        super().__init__(kind, gather_across_ranks)
        self.mini_batch_size = mini_batch_size

    def forward(self, model, batch) -> torch.Tensor:
        scale, bias = temperature(model)
        extra = [p for p in (scale, bias) if p is not None and p.requires_grad]
        return self.cached(model, batch, lambda c: self.compute(c[0], c[1], batch["text_ids"], scale, bias), extra)


def temperature(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A dual encoder's learnable log-scale and logit bias (None without one), through any DDP wrapper."""
    inner = getattr(model, "module", model)
    return inner.logit_scale, inner.logit_bias
