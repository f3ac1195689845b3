"""Poolings: turn per-token hidden states into one vector per text.

One small class per pooling, chosen by ``_target_`` in ``conf/pooling/``. Each takes the encoder's
hidden states of the selected ``layers`` (several layers are averaged, or mixed with learned softmax
weights by :class:`WeightedLayerPooling`), reduces the token axis respecting the attention mask, and
optionally L2-normalizes. Padded positions never influence the result, whichever side is padded.

Shapes: hidden states ``(batch, seq, hidden)``, attention mask ``(batch, seq)`` of 0/1, output
``(batch, hidden)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Pooling(nn.Module):
    """Base class: layer selection, token reduction (``reduce``) and optional normalization."""

    def __init__(self, layers: Sequence[int] = (-1,), normalize: bool = False) -> None:
        super().__init__()
        if not layers:
            raise ValueError("pooling.layers must name at least one layer, e.g. [-1]")
        self.layers = [int(i) for i in layers]
        self.normalize = normalize

    @property
    def needs_all_layers(self) -> bool:
        """Whether the encoder must return every layer's hidden states (not only the last)."""
        return self.layers != [-1]

    def combine_layers(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        chosen = [hidden_states[i] for i in self.layers]
        return chosen[0] if len(chosen) == 1 else torch.stack(chosen).mean(dim=0)

    def reduce(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.combine_layers(hidden_states)
        pooled = self.reduce(tokens, attention_mask.to(tokens.dtype))
        return nn.functional.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    # -------------------------------------------------------------- frozen encoders (mode=head_only)
    # An encoder that never changes is run once per text (runner/features.py); what is kept is the layout
    # of ``frozen_layout``, the same for every pooling, so a search over poolings encodes each text once.

    def from_frozen(self, features: torch.Tensor) -> torch.Tensor:
        """This pooling's output from the frozen-feature layout (batch, 3 * layers + 1, hidden)."""
        pooled = self.pick_frozen(features)
        return nn.functional.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    def pick_frozen(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        """The config that rebuilds this pooling (saved with the model)."""
        return {
            "_target_": f"{type(self).__module__}.{type(self).__qualname__}",
            "layers": self.layers,
            "normalize": self.normalize,
        }


class MeanPooling(Pooling):
    """Average of the real tokens' vectors."""

    def reduce(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        summed = (tokens * mask.unsqueeze(-1)).sum(dim=1)
        return summed / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)

    def pick_frozen(self, features):
        return frozen_part(features, 0).mean(dim=1)  # the token mean is linear: per-layer means average


class MaxPooling(Pooling):
    """Element-wise maximum over the real tokens."""

    def reduce(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        padded = mask.unsqueeze(-1) == 0
        return tokens.masked_fill(padded, torch.finfo(tokens.dtype).min).max(dim=1).values

    def pick_frozen(self, features):
        return features[:, -1]  # the maximum is not linear: it is kept for the averaged layers themselves


class ClsPooling(Pooling):
    """The first real token ([CLS] in BERT-style encoders), found through the mask so left padding works."""

    def reduce(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        first = mask.argmax(dim=1)  # argmax returns the first maximal index
        return tokens[torch.arange(tokens.size(0), device=tokens.device), first]

    def pick_frozen(self, features):
        return frozen_part(features, 1).mean(dim=1)


class LastTokenPooling(Pooling):
    """The last real token, as decoder embedders (Qwen-style, e5-mistral) use; left or right padding."""

    def reduce(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(mask.size(1), device=mask.device, dtype=mask.dtype)
        last = (mask * (positions + 1)).argmax(dim=1)  # +1 so position 0 of an all-pad row is not chosen over a real one
        return tokens[torch.arange(tokens.size(0), device=tokens.device), last]

    def pick_frozen(self, features):
        return frozen_part(features, 2).mean(dim=1)


class WeightedLayerPooling(MeanPooling):
    """Mean over tokens of a learned softmax-weighted sum of the chosen layers (weights start equal)."""

    def __init__(self, layers: Sequence[int] = (-4, -3, -2, -1), normalize: bool = False) -> None:
        super().__init__(layers, normalize)
        self.layer_logits = nn.Parameter(torch.zeros(len(self.layers)))

    @property
    def needs_all_layers(self) -> bool:
        return True

    def combine_layers(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack([hidden_states[i] for i in self.layers])  # (layers, batch, seq, hidden)
        weights = torch.softmax(self.layer_logits, dim=0).to(stacked.dtype)
        return torch.einsum("l,lbsh->bsh", weights, stacked)

    def pick_frozen(self, features):
        # the weighted sum of layers is linear too: the weighted sum of the per-layer token means
        weights = torch.softmax(self.layer_logits, dim=0).to(features.dtype)
        return torch.einsum("l,blh->bh", weights, frozen_part(features, 0))


# What a saved folder may name as its pooling: the exact names ``describe`` writes, looked up in this table
# (never resolved as a dotted path: a folder is data, and a walk through modules would reach any callable).
POOLINGS: dict[str, type[Pooling]] = {
    f"runner.pooling.{cls.__name__}": cls
    for cls in (MeanPooling, MaxPooling, ClsPooling, LastTokenPooling, WeightedLayerPooling)
}


def pooling_from_spec(spec: dict, where: str) -> Pooling:
    """The pooling a saved folder describes (``describe``'s dict), built from this module's own classes with
    only their known arguments, checked for type; anything else is refused naming ``where``."""
    from runner.errors import RunnerError

    spec = dict(spec) if isinstance(spec, dict) else {}
    target = spec.pop("_target_", None)
    cls = POOLINGS.get(target) if isinstance(target, str) else None
    if cls is None:
        raise RunnerError(f"{where}: unknown pooling {str(target)[:200]!r}; this runner offers "
                          f"{', '.join(sorted(POOLINGS))}")
    unknown = set(spec) - {"layers", "normalize"}
    layers, normalize = spec.get("layers", [-1]), spec.get("normalize", False)
    if unknown or not isinstance(normalize, bool) or not isinstance(layers, list) or not layers \
            or len(layers) > 1024 or not all(type(i) is int for i in layers):
        raise RunnerError(f"{where}: pooling arguments {str(spec)[:200]} are not a list of layer indices and a normalize flag")
    return cls(layers=layers, normalize=normalize)


def frozen_layout(hidden_states: Sequence[torch.Tensor], mask: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """What a frozen encoder's output is kept as, per text: (batch, 3 * len(layers) + 1, hidden) =
    the token mean, first and last real token of each chosen layer, then the token maximum of the chosen
    layers' average. Every pooling above (any layers, normalize or not) is computed from it exactly."""
    mask = mask.to(hidden_states[-1].dtype)
    per_layer = [[MeanPooling().reduce(hidden_states[i], mask) for i in layers],
                 [ClsPooling().reduce(hidden_states[i], mask) for i in layers],
                 [LastTokenPooling().reduce(hidden_states[i], mask) for i in layers]]
    averaged = torch.stack([hidden_states[i] for i in layers]).mean(dim=0)
    rows = [t for part in per_layer for t in part] + [MaxPooling().reduce(averaged, mask)]
    return torch.stack(rows, dim=1)


def frozen_part(features: torch.Tensor, part: int) -> torch.Tensor:
    """Part 0 (means), 1 (first tokens) or 2 (last tokens) of the layout: (batch, layers, hidden)."""
    n = (features.size(1) - 1) // 3
    return features[:, part * n : (part + 1) * n]
