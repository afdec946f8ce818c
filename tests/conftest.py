"""Fixtures shared by every test package: synthetic audio, the real RAVDESS copy, a tiny encoder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
RAVDESS = Path(os.environ.get("SER_TEST_RAVDESS", REPO.parent / "shared" / "corpora" / "ravdess"))


def synth_speech(seconds: float, sample_rate: int, *, channels: int = 1, f0: float = 180.0,
                 seed: int = 0) -> np.ndarray:
    """A voiced, speech-like signal: harmonics of a wobbling f0 with a syllable envelope, ``[N, C]``."""
    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * sample_rate)))
    t = np.arange(n) / sample_rate
    f = f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))
    phase = 2 * np.pi * np.cumsum(f) / sample_rate
    x = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 4 * t)) + 0.05
    x = 0.2 * x * envelope + 0.005 * rng.standard_normal(n)
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


@pytest.fixture
def kill_after_first_fold():
    """``kill(args, out, model_file)``: run ``python -m <args>`` (a trainer writing the run ``out``), SIGKILL it
    once ``model_file`` (e.g. ``fold_0.joblib``) is in its staging folder, i.e. mid-run; fails if it never gets
    there."""
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]

    def kill(args, out: Path, model_file: str) -> None:
        process = subprocess.Popen([sys.executable, "-m", *args], cwd=repo,
                                   env={**os.environ, "PYTHONPATH": str(repo)},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        staged = out.with_name(f".{out.name}.tmp-{process.pid}") / "models" / model_file
        deadline = time.monotonic() + 240
        while not staged.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        alive = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert staged.exists() and alive, "the trainer never saved its first fold"

    return kill


@pytest.fixture
def write_audio():
    """Write synthetic speech: ``write_audio(path, seconds=1.0, sample_rate=16000, channels=1, **kw)``."""

    def _write(path, *, seconds: float = 1.0, sample_rate: int = 16000, channels: int = 1,
               subtype: str = "PCM_16", format: str | None = None, **kw) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), synth_speech(seconds, sample_rate, channels=channels, **kw), sample_rate,
                 subtype=subtype, format=format)
        return path

    return _write


@pytest.fixture(scope="session")
def ravdess_root() -> Path:
    """The real RAVDESS speech copy (16 kHz FLAC), read in place; skips when absent."""
    if not (RAVDESS / "Actor_01").is_dir():
        pytest.skip(f"real RAVDESS not found at {RAVDESS}")
    return RAVDESS


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised wav2vec2 (GroupNorm feature extraction), saved with ``save_pretrained``.

    It is loaded by path through exactly the code that loads ``facebook/wav2vec2-base``.
    Conv strides multiply to 320 (20 ms frames at 16 kHz), as in the base model.
    """
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16, 16), conv_kernel=(10, 8, 4), conv_stride=(5, 8, 8),
        feat_extract_norm="group", num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        do_stable_layer_norm=False, vocab_size=8,
    )
    out = tmp_path_factory.mktemp("tiny-wav2vec2")
    Wav2Vec2Model(config).eval().save_pretrained(out, safe_serialization=True)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                             do_normalize=True, return_attention_mask=False).save_pretrained(out)
    return out


#: Tiny stand-ins carrying each real checkpoint's architecture flags (7 convolutions of the real kernels and
#: strides, so 20 ms frames; 32 channels per positional-convolution group: fewer make oneDNN's bfloat16 grouped
#: convolution unreliable).
TINY_ARCHITECTURES = {
    "wav2vec2-base": ("Wav2Vec2", {"feat_extract_norm": "group", "do_stable_layer_norm": False, "conv_bias": False}),
    "wav2vec2-large-lv60": ("Wav2Vec2", {"feat_extract_norm": "layer", "do_stable_layer_norm": True,
                                         "conv_bias": True}),
    "hubert-base": ("Hubert", {"feat_extract_norm": "group", "do_stable_layer_norm": False, "conv_bias": False}),
    "wavlm-base-plus": ("WavLM", {"feat_extract_norm": "group", "do_stable_layer_norm": False, "conv_bias": False,
                                  "num_buckets": 32, "max_bucket_distance": 80}),
    "data2vec-audio-base": ("Data2VecAudio", {"conv_bias": True, "num_conv_pos_embedding_layers": 5,
                                              "conv_pos_kernel_size": 5}),
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(name, seed=0, **config)`` -> a folder saved with ``save_pretrained`` holding a tiny, randomly
    initialised model with the flags of ``name`` (a key of ``TINY_ARCHITECTURES``); built once per arguments."""
    import torch
    import transformers

    built: dict = {}

    def build(name: str, seed: int = 0, **overrides) -> Path:
        key = (name, seed, tuple(sorted(overrides.items())))
        if key not in built:
            prefix, flags = TINY_ARCHITECTURES[name]
            kw = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
                  "conv_dim": (32,) * 7, "num_conv_pos_embedding_groups": 2, "vocab_size": 8, **flags, **overrides}
            if prefix != "Data2VecAudio":
                kw.setdefault("num_conv_pos_embeddings", 16)
            torch.manual_seed(seed)
            config = getattr(transformers, f"{prefix}Config")(**kw)
            out = tmp_path_factory.mktemp(name)
            getattr(transformers, f"{prefix}Model")(config).eval().save_pretrained(out)
            transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(out)
            built[key] = out
        return built[key]

    return build
