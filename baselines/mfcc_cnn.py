"""The seed's MFCC-CNN baseline, in a cheap form: log-mel (or MFCC) frames computed from the audio, a small 2D
CNN, trained with the training core's loop (``training.fit``) and saved like a head (``kind: mfcc_cnn``).

The CNN takes the heads' input convention, ``(features [B, 1, T, F], lengths [B])`` with ``F`` mel bands (or
MFCCs), so batching, normalisation (per band, training speakers only), early stopping and saving are shared.

Example:
    >>> x = log_mel(load_audio(path))                                  # [1, T, 64]   # doctest: +SKIP
    >>> MfccCnn(num_layers=1, input_dim=64, num_classes=8)(torch.from_numpy(x)[None], torch.tensor([x.shape[1]]))
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy.fft import dct
from torch import nn

from pipeline.audio import SAMPLE_RATE, load_audio
from training.pooling import masked_mean


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular filters on the HTK mel scale, ``[n_mels, n_fft // 2 + 1]``."""
    mel = 2595.0 * np.log10(1.0 + np.array([0.0, sample_rate / 2]) / 700.0)
    hz = 700.0 * (10 ** (np.linspace(mel[0], mel[1], n_mels + 2) / 2595.0) - 1.0)
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    lower, centre, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def log_mel(x: np.ndarray, *, sample_rate: int = SAMPLE_RATE, n_mels: int = 64, win_ms: float = 25.0,
            hop_ms: float = 10.0, n_mfcc: int | None = None) -> np.ndarray:
    """Log-mel energies (or their first ``n_mfcc`` DCT coefficients, MFCCs) of a mono waveform.

    Args:
        x: ``[N]`` float waveform at ``sample_rate``.

    Returns:
        ``[1, T, F]`` float32 with ``F = n_mels`` (or ``n_mfcc``), one frame per ``hop_ms``.
    """
    win, hop = int(sample_rate * win_ms / 1000), int(sample_rate * hop_ms / 1000)
    n_fft = 1 << (win - 1).bit_length()
    x = np.pad(np.asarray(x, np.float32), (0, max(0, win - len(x))))
    frames = np.lib.stride_tricks.sliding_window_view(x, win)[::hop] * np.hanning(win).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, n=n_fft)) ** 2
    feats = np.log(power @ mel_filterbank(sample_rate, n_fft, n_mels).T + 1e-6)
    if n_mfcc:
        feats = dct(feats, type=2, norm="ortho", axis=-1)[:, :n_mfcc]
    return feats.astype(np.float32)[None]


class AudioFrames:
    """Reader: utterance id to :func:`log_mel` frames ``[1, T, F]`` of its audio file."""

    def __init__(self, paths: Mapping[str, str], settings: Mapping):
        self.paths, self.settings = paths, dict(settings)

    def __call__(self, uid: str) -> np.ndarray:
        rate = self.settings.get("sample_rate", SAMPLE_RATE)
        return log_mel(load_audio(self.paths[uid], sample_rate=rate), **self.settings)


class MfccCnn(nn.Module):
    """Three conv blocks (3x3 conv, batch norm, ReLU, 2x2 max-pool), mean over frequency, masked mean over
    time, dropout, linear.

    Args:
        num_layers: must be 1 (one feature "layer": the spectrogram).
        input_dim: ``F`` (mel bands or MFCCs).
        num_classes: ``C``.
        channels: channels of the three blocks.
        dropout: before the output layer.
    """

    def __init__(self, num_layers: int, input_dim: int, num_classes: int, *,
                 channels: tuple[int, ...] = (16, 32, 64), dropout: float = 0.3):
        super().__init__()
        if num_layers != 1:
            raise ValueError(f"MfccCnn expects one layer of spectral frames; got num_layers={num_layers}.")
        blocks, previous = [], 1
        for width in channels:
            blocks += [nn.Conv2d(previous, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            previous = width
        self.blocks = nn.Sequential(*blocks)
        self.pool_factor = 2 ** len(channels)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(previous, num_classes)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``features [B, 1, T, F]`` (zero beyond each length), ``lengths [B]`` to logits ``[B, C]``.

        After each block the frames beyond an utterance's (pooled) length are zeroed again, so that the next 3x3
        convolution sees zeros there, as it sees its own zero padding at the end of an utterance alone: in
        evaluation an utterance's logits do not depend on the batch it is padded into (``heads.predict``
        classifies one file at a time, the trainer evaluates folds in batches)."""
        x = features
        for k in range(0, len(self.blocks), 4):
            conv, norm, relu, pool = self.blocks[k:k + 4]
            x = pool(relu(norm(conv(x))))  # a kept pooled frame covers two frames within the length
            lengths = lengths // 2
            valid = torch.arange(x.shape[2], device=x.device) < lengths[:, None]  # [B, T / 2]
            x = x * valid[:, None, :, None]
        x = x.mean(dim=3).transpose(1, 2)  # [B, T / 2^k, channels]
        pooled_lengths = lengths.clamp(min=1, max=x.shape[1])
        return self.out(self.dropout(masked_mean(x, pooled_lengths)))
