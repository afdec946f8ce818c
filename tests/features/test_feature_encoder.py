"""The frozen encoder: loading, exact forward, windowing of long inputs, loading errors."""

from __future__ import annotations

import numpy as np
import pytest

from features.encoder import load_encoder


@pytest.fixture(scope="module")
def enc(tiny_encoder_dir):
    return load_encoder(tiny_encoder_dir, device="cpu")


def _wave(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)


def test_loads_by_path(enc, tiny_encoder_dir):
    assert (enc.sample_rate, enc.num_layers, enc.hidden_size, enc.stride) == (16000, 4, 32, 320)
    assert enc.revision.startswith("local:") and enc.device.type == "cpu"
    assert not any(p.requires_grad for p in enc.model.parameters())


@pytest.mark.parametrize("seconds", [0.3, 1.7])
def test_hidden_states_equal_direct_forward(enc, direct_forward, seconds):
    wave = _wave(seconds)
    got = enc.hidden_states(wave)
    want = direct_forward(wave)
    assert got.dtype == np.float32 and got.shape == want.shape == (4, enc.num_frames(len(wave)), 32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layer_selection(enc):
    wave = _wave(0.5)
    np.testing.assert_array_equal(enc.hidden_states(wave, layers=[0, 3]), enc.hidden_states(wave)[[0, 3]])


def test_long_input_is_windowed_in_bounded_memory(tiny_encoder_dir, direct_forward, monkeypatch):
    enc = load_encoder(tiny_encoder_dir, device="cpu", chunk_seconds=1.0, overlap_seconds=0.4)
    seen = []
    forward = enc.forward
    monkeypatch.setattr(enc, "forward", lambda batch, **kw: seen.append(batch.shape[-1]) or forward(batch, **kw))
    wave = _wave(7.3)
    got = enc.hidden_states(wave)
    want = direct_forward(wave)
    assert got.shape == want.shape                                   # same frame grid as one pass
    assert len(seen) == 8 and max(seen) <= enc.max_single_samples     # never more than one window
    assert enc.max_single_samples < 2.0 * 16000
    # windows see only 0.4 s of context and their own GroupNorm statistics: close, not equal
    corr = np.corrcoef(got[-1].ravel(), want[-1].ravel())[0, 1]
    assert corr > 0.9


def test_too_short_input(enc):
    with pytest.raises(ValueError, match="at least 165 samples"):
        enc.hidden_states(np.zeros(100, np.float32))


def test_bfloat16_returns_float32(tiny_encoder_dir, enc):
    bf = load_encoder(tiny_encoder_dir, device="cpu", dtype="bfloat16")
    wave = _wave(1.0)
    got, ref = bf.hidden_states(wave), enc.hidden_states(wave)
    assert got.dtype == np.float32 and got.shape == ref.shape
    cos = (got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref)
    assert 0.98 < cos < 1.0


def test_unknown_dtype(tiny_encoder_dir):
    with pytest.raises(ValueError, match="expected one of"):
        load_encoder(tiny_encoder_dir, dtype="int8")


def test_offline_without_model_says_how_to_point_at_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as err:
        load_encoder("ser-tests/no-such-encoder", device="cpu")
    message = str(err.value)
    assert "--encoder" in message and "SER_ENCODER" in message and "params.yaml" in message


def test_cuda_requested_without_gpu(tiny_encoder_dir):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="--device cpu"):
        load_encoder(tiny_encoder_dir, device="cuda")
