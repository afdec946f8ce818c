"""Pooling over the valid frames of each utterance, shared by the heads and the MFCC-CNN baseline.

Inputs are ``x [B, T, D]`` with ``lengths [B]`` valid frames per utterance (padding beyond them never counts).

Example:
    >>> import torch
    >>> masked_mean(torch.ones(2, 4, 3), torch.tensor([4, 1])).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the valid frames of each utterance.

    Args:
        x: ``[B, T, D]``.
        lengths: ``[B]`` number of valid frames (at least 1).

    Returns:
        ``[B, D]``.
    """
    weights = _frame_weights(x, lengths)
    return torch.bmm(weights, x).squeeze(1)


def _frame_weights(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T]``: 1 / length on each utterance's valid frames, 0 on padding (a mean as a matrix product,
    so no ``[B, T, D]`` masked copy is made)."""
    mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
    return (mask / mask.sum(dim=1, keepdim=True).clamp_min(1.0)).unsqueeze(1)


def masked_mean_std(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean ‖ standard deviation over the valid frames of each utterance: ``[B, T, D]`` to ``[B, 2D]``."""
    weights = _frame_weights(x, lengths)
    mean = torch.bmm(weights, x)                       # [B, 1, D]
    centred = x - mean
    var = torch.bmm(weights, centred * centred).squeeze(1)
    return torch.cat([mean.squeeze(1), var.clamp_min(1e-8).sqrt()], dim=-1)


#: Pooling over frames: name to ``(function, output width multiplier)``.
POOLING = {"mean": (masked_mean, 1), "stats": (masked_mean_std, 2)}
