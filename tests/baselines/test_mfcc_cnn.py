"""Log-mel frames and the MFCC-CNN have the expected shapes and respect lengths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from baselines.mfcc_cnn import MfccCnn, log_mel, mel_filterbank


def test_log_mel_and_mfcc_shapes():
    x = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32)
    assert log_mel(x, n_mels=40).shape == (1, 98, 40)
    assert log_mel(x, n_mels=40, n_mfcc=13).shape == (1, 98, 13)
    band = log_mel(x, n_mels=40)[0].mean(axis=0).argmax()
    centre = np.fft.rfftfreq(512, 1 / 16000)[mel_filterbank(16000, 512, 40)[band].argmax()]
    assert 350 < centre < 550  # the 440 Hz tone lands in the right band


def test_mfcc_cnn_respects_lengths():
    torch.manual_seed(0)
    model = MfccCnn(num_layers=1, input_dim=32, num_classes=4).eval()
    x = torch.randn(2, 1, 64, 32)
    lengths = torch.tensor([64, 40])
    logits = model(x, lengths)
    assert logits.shape == (2, 4)
    with pytest.raises(ValueError, match="one layer"):
        MfccCnn(num_layers=2, input_dim=32, num_classes=4)
