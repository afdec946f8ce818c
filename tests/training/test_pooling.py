"""Pooling over frames ignores padding."""

from __future__ import annotations

import torch

from training.pooling import masked_mean, masked_mean_std


def test_masked_mean_ignores_padding():
    x = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    pooled = masked_mean(x, torch.tensor([3, 1]))
    assert torch.allclose(pooled, torch.stack([x[0].mean(0), x[1, 0]]))


def test_stats_pooling_is_mean_and_std_of_valid_frames_only():
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [2.0], [2.0]]])
    pooled = masked_mean_std(x, torch.tensor([2, 3]))
    assert torch.allclose(pooled, torch.tensor([[2.0, 1.0], [2.0, 0.0]]), atol=1e-3)
