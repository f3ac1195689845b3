"""Every pooling respects the attention mask: padding (left or right, any amount) never changes the vector."""

from __future__ import annotations

import pytest
import torch

from runner.pooling import ClsPooling, LastTokenPooling, MaxPooling, MeanPooling, WeightedLayerPooling

POOLINGS = [MeanPooling, MaxPooling, ClsPooling, LastTokenPooling, WeightedLayerPooling]


def layer_stack(tokens: torch.Tensor, n: int = 5) -> tuple[torch.Tensor, ...]:
    """Fake per-layer hidden states: layer i is tokens * (i + 1), so layer choice is visible."""
    return tuple(tokens * (i + 1) for i in range(n))


def pad(tokens: torch.Tensor, extra: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Add ``extra`` padding positions filled with large garbage values on one side."""
    garbage = torch.full((tokens.size(0), extra, tokens.size(2)), 1e4)
    mask = torch.ones(tokens.shape[:2])
    pad_mask = torch.zeros(tokens.size(0), extra)
    if side == "right":
        return torch.cat([tokens, garbage], 1), torch.cat([mask, pad_mask], 1)
    return torch.cat([garbage, tokens], 1), torch.cat([pad_mask, mask], 1)


@pytest.mark.parametrize("cls", POOLINGS)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("layers", [[-1], [-3, -2, -1]])
def test_padding_never_changes_the_pooled_vector(cls, side, layers):
    torch.manual_seed(0)
    pooling = cls(layers=layers, normalize=False)
    tokens = torch.randn(1, 6, 8)
    reference = pooling(layer_stack(tokens), torch.ones(1, 6))
    for extra in (1, 7):
        padded, mask = pad(tokens, extra, side)
        torch.testing.assert_close(pooling(layer_stack(padded), mask), reference)


@pytest.mark.parametrize("cls", POOLINGS)
def test_a_batch_of_different_lengths_pools_each_row_as_if_alone(cls):
    torch.manual_seed(1)
    pooling = cls(layers=[-1], normalize=True)
    short, long = torch.randn(1, 3, 8), torch.randn(1, 9, 8)
    for side in ("right", "left"):
        short_padded, short_mask = pad(short, 6, side)
        batch = torch.cat([short_padded, long]), torch.cat([short_mask, torch.ones(1, 9)])
        pooled = pooling(layer_stack(batch[0]), batch[1])
        torch.testing.assert_close(pooled[0], pooling(layer_stack(short), torch.ones(1, 3))[0])
        torch.testing.assert_close(pooled[1], pooling(layer_stack(long), torch.ones(1, 9))[0])


def test_values_against_hand_computation():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [9.0, 9.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    hs = (tokens,)
    torch.testing.assert_close(MeanPooling()(hs, mask), torch.tensor([[2.0, -1.0]]))
    torch.testing.assert_close(MaxPooling()(hs, mask), torch.tensor([[3.0, 2.0]]))
    torch.testing.assert_close(ClsPooling()(hs, mask), torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(LastTokenPooling()(hs, mask), torch.tensor([[3.0, -4.0]]))
    torch.testing.assert_close(MeanPooling(normalize=True)(hs, mask), torch.tensor([[2.0, -1.0]]) / 5**0.5)


def test_several_layers_are_averaged_and_weighted_starts_equal():
    tokens = torch.randn(2, 4, 8)
    mask = torch.ones(2, 4)
    hs = layer_stack(tokens)  # layer i = tokens * (i + 1); last two: 4x and 5x
    torch.testing.assert_close(MeanPooling(layers=[-2, -1])(hs, mask), tokens.mean(1) * 4.5)
    weighted = WeightedLayerPooling(layers=[-2, -1])
    torch.testing.assert_close(weighted(hs, mask), tokens.mean(1) * 4.5)
    with torch.no_grad():
        weighted.layer_logits.copy_(torch.tensor([-1e4, 0.0]))  # all weight on the last layer
    torch.testing.assert_close(weighted(hs, mask), tokens.mean(1) * 5)


def test_weighted_layer_weights_receive_gradients():
    weighted = WeightedLayerPooling(layers=[-3, -2, -1])
    hs = layer_stack(torch.randn(2, 4, 8))
    weighted(hs, torch.ones(2, 4)).pow(2).sum().backward()
    assert weighted.layer_logits.grad is not None and weighted.layer_logits.grad.abs().sum() > 0


def test_only_the_last_layer_needs_no_hidden_state_stack():
    assert not MeanPooling(layers=[-1]).needs_all_layers
    assert MeanPooling(layers=[-2, -1]).needs_all_layers
    assert WeightedLayerPooling(layers=[-1]).needs_all_layers
