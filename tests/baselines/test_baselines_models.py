"""Baseline estimators follow scikit-learn's rules; log-mel frames and the CNN have the expected shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone

from baselines.mfcc_cnn import MfccCnn, log_mel, mel_filterbank
from baselines.models import MODELS, build_model, speaker_standardise


@pytest.mark.parametrize("name", sorted(MODELS))
def test_estimators_follow_sklearn_rules(name):
    model = build_model(name, seed=3)
    assert clone(model).get_params().keys() == model.get_params().keys()
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 4)), np.repeat([0, 1, 2], 20)
    X[:, 0] += 3 * y
    assert model.fit(X, y) is model
    assert model.predict_proba(X).shape == (60, 3) and (model.predict(X) == y).mean() > 0.9


def test_unknown_baseline_is_refused():
    with pytest.raises(ValueError, match="unknown baseline 'knn'"):
        build_model("knn")


def test_speaker_standardise_uses_each_speakers_rows():
    X = np.array([[1.0, 10], [3, 30], [100, 0], [300, 2]])
    out = speaker_standardise(X, np.array(["a", "a", "b", "b"]))
    np.testing.assert_allclose(out, [[-1, -1], [1, 1], [-1, -1], [1, 1]])


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
