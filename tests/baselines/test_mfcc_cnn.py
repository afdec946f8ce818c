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


@pytest.mark.parametrize("length", [9, 157, 160, 202])
def test_an_utterances_logits_do_not_depend_on_the_batch_it_is_padded_into(length):
    torch.manual_seed(0)
    model = MfccCnn(num_layers=1, input_dim=32, num_classes=4)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # as after training
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2), norm.bias.data.uniform_(-1, 1)
    model.eval()
    short, long = torch.randn(1, 1, length, 32), torch.randn(1, 1, 203, 32)
    batch = torch.zeros(2, 1, 203, 32)  # zero-padded, as training.data.collate pads
    batch[0, :, :length], batch[1] = short[0], long[0]
    with torch.no_grad():
        padded = model(batch, torch.tensor([length, 203]))
        alone = torch.cat([model(short, torch.tensor([length])), model(long, torch.tensor([203]))])
    torch.testing.assert_close(padded, alone, atol=1e-6, rtol=1e-5)  # heads.predict classifies files alone
