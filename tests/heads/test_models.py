"""Heads: shapes, zero-initialised layer weights, padding invariance."""

from __future__ import annotations

import pytest
import torch

from heads.models import HEADS, FastDropout, LayerWeights, Pointwise, build_head


def test_layer_weights_start_equal():
    weights = LayerWeights(4)
    assert torch.equal(weights.logits, torch.zeros(4))
    assert torch.allclose(weights.weights(), torch.full((4,), 0.25))
    x = torch.randn(2, 4, 5, 3)
    assert torch.allclose(weights(x), x.mean(dim=1), atol=1e-6)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_shape_and_padding_invariance(name):
    torch.manual_seed(0)
    head = build_head(name, num_layers=3, input_dim=6, num_classes=5).eval()
    x = torch.randn(2, 3, 7, 6)
    lengths = torch.tensor([7, 4])
    logits = head(x, lengths)
    assert logits.shape == (2, 5)
    padded = x.clone()
    padded[1, :, 4:] = 100.0  # garbage beyond the true length changes nothing
    assert torch.allclose(head(padded, lengths), logits, atol=1e-5)


def test_unknown_head_is_refused():
    with pytest.raises(ValueError, match="unknown head 'mlp'; expected one of"):
        build_head("mlp", num_layers=1, input_dim=2, num_classes=2)


def test_conv_head_with_stats_pooling_ignores_padding_and_checks_its_name():
    head = build_head("conv", num_layers=2, input_dim=4, num_classes=3, pooling="stats").eval()
    x = torch.randn(1, 2, 5, 4)
    padded = torch.cat([x, torch.randn(1, 2, 3, 4)], dim=2)
    assert torch.allclose(head(x, torch.tensor([5])), head(padded, torch.tensor([5])), atol=1e-5)
    with pytest.raises(ValueError, match="unknown pooling"):
        build_head("conv", num_layers=1, input_dim=4, num_classes=3, pooling="max")


def test_pointwise_is_a_kernel_one_conv_over_channels_last_frames():
    torch.manual_seed(0)
    layer, x = Pointwise(5, 3), torch.randn(2, 7, 5)
    expected = torch.nn.functional.conv1d(x.transpose(1, 2), layer.weight, layer.bias).transpose(1, 2)
    torch.testing.assert_close(layer(x), expected)
    assert layer.weight.shape == (3, 5, 1)  # saved exactly as nn.Conv1d(5, 3, 1) is


def test_fast_dropout_drops_at_rate_p_and_keeps_the_mean():
    torch.manual_seed(0)
    drop, x = FastDropout(0.3), torch.ones(200_000)
    y = drop(x)
    assert abs(float((y == 0).float().mean()) - 0.3) < 0.01
    assert abs(float(y.mean()) - 1.0) < 0.01
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1.0 / 0.7))
    assert torch.equal(drop.eval()(x), x) and torch.equal(FastDropout(0.0).train()(x), x)
    assert torch.equal(FastDropout(1.0).train()(x), torch.zeros_like(x))
