"""Classification heads over frame-level features, and the registry that names them.

Every head takes ``(features [B, L, T, H], lengths [B])`` and returns logits ``[B, C]``: ``L`` layers of ``T``
frames of ``H`` dimensions (wav2vec2 hidden states, or eGeMAPS low-level descriptors as one layer), of which
only the first ``lengths[b]`` frames of utterance ``b`` are real. Heads do no I/O and seed nothing.

Example:
    >>> import torch
    >>> head = HEADS["conv"](num_layers=13, input_dim=768, num_classes=8)
    >>> head(torch.zeros(2, 13, 50, 768), torch.tensor([50, 20])).shape
    torch.Size([2, 8])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.pooling import POOLING, masked_mean


class LayerWeights(nn.Module):
    """A learned convex combination of layers: softmax over a zero-initialised parameter (s3prl style).

    Args:
        num_layers: ``L``.
    """

    def __init__(self, num_layers: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_layers))

    def weights(self) -> torch.Tensor:
        """``[L]`` softmax weights (all equal at initialisation)."""
        return torch.softmax(self.logits, dim=0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, L, T, H]`` to ``[B, T, H]``."""
        return torch.einsum("l,blth->bth", self.weights(), features)


class Pointwise(nn.Conv1d):
    """A kernel-1 ``nn.Conv1d`` applied to channels-last frames ``[N, C_in]`` (all frames of a batch as rows) as one
    matrix product: the same parameters (and saved weights) as the convolution, without transposing the frames to
    ``[B, C, T]``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C_in]`` to ``[N, C_out]``."""
        return F.linear(x, self.weight.squeeze(-1), self.bias)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with its mask drawn from uniform numbers: the same distribution, drawn faster on CPU than
    ``bernoulli_`` draws it (the head's training step spends much of its time in dropout; the figure is in
    ``docs/benchmarks.md``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p >= 1:
            return torch.zeros_like(x)
        return x * torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))  # mask built in place: 1/(1-p) or 0


class LinearHead(nn.Module):
    """Layer weights, masked mean pooling over valid frames, then one linear layer.

    Args:
        num_layers: ``L``.
        input_dim: ``H``.
        num_classes: ``C``.
        dropout: dropout on the pooled vector.
    """

    def __init__(self, num_layers: int, input_dim: int, num_classes: int, *, dropout: float = 0.0):
        super().__init__()
        self.layer_weights = LayerWeights(num_layers)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(input_dim, num_classes)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``features [B, L, T, H]``, ``lengths [B]`` to logits ``[B, C]``."""
        pooled = masked_mean(self.layer_weights(features), lengths)
        return self.out(self.dropout(pooled))


class ConvHead(nn.Module):
    """Pepino et al. (2021): layer weights, two pointwise Conv1d (ReLU, dropout), masked mean, two linears.

    Args:
        num_layers: ``L``.
        input_dim: ``H``.
        num_classes: ``C``.
        hidden: channels of the convolutions and width of the first linear layer.
        dropout: dropout after each convolution and before the output layer.
        pooling: ``mean`` (Pepino et al.) or ``stats`` (mean ‖ standard deviation over valid frames).
    """

    def __init__(self, num_layers: int, input_dim: int, num_classes: int, *, hidden: int = 128,
                 dropout: float = 0.2, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLING:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {sorted(POOLING)}.")
        self.pool, width = POOLING[pooling]
        self.layer_weights = LayerWeights(num_layers)
        # over the batch's frames as rows, [B * T, C]: a product's output is then a tensor of its own, not a view
        # of one, so the in-place ReLUs leave autograd no view to rebuild (copies and zero-fills in the backward)
        self.convs = nn.Sequential(
            Pointwise(input_dim, hidden), nn.ReLU(inplace=True), FastDropout(dropout),
            Pointwise(hidden, hidden), nn.ReLU(inplace=True), FastDropout(dropout),
        )
        self.classifier = nn.Sequential(
            nn.Linear(width * hidden, hidden), nn.ReLU(), FastDropout(dropout), nn.Linear(hidden, num_classes),
        )

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``features [B, L, T, H]``, ``lengths [B]`` to logits ``[B, C]``."""
        frames = self.layer_weights(features)  # [B, T, H]
        x = self.convs(frames.reshape(-1, frames.shape[-1]))  # [B * T, hidden]
        return self.classifier(self.pool(x.view(*frames.shape[:-1], -1), lengths))


#: Head name to class; each is called as ``factory(num_layers=, input_dim=, num_classes=, **kwargs)``.
HEADS: dict[str, type[nn.Module]] = {"linear": LinearHead, "conv": ConvHead}


def build_head(name: str, *, num_layers: int, input_dim: int, num_classes: int, **kwargs) -> nn.Module:
    """Instantiate a registered head.

    Raises:
        ValueError: unknown head name.
    """
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; expected one of {sorted(HEADS)}.")
    return HEADS[name](num_layers=num_layers, input_dim=input_dim, num_classes=num_classes, **kwargs)
