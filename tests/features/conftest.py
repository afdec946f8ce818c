"""Fixtures for the feature tests: manifests built with pandas, and a direct forward pass for reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from features.store import escape_id

MANIFEST_COLUMNS = ["id", "path", "corpus", "speaker", "gender", "emotion", "duration_s", "sample_rate", "channels"]


def manifest_rows(paths, *, corpus: str = "synth", ids=None) -> pd.DataFrame:
    """Manifest rows for audio files, ids ``corpus/<parent>/<stem>`` unless given."""
    rows = []
    for i, p in enumerate(paths):
        p = Path(p)
        try:
            info = sf.info(str(p))
            dur, rate, ch = info.frames / info.samplerate, info.samplerate, info.channels
        except Exception:  # bad files still get a row: extraction must report them
            dur, rate, ch = 1.0, 16000, 1
        uid = ids[i] if ids else f"{corpus}/{p.parent.name}/{p.stem}"
        rows.append({"id": uid, "path": str(p.resolve()), "corpus": corpus, "speaker": f"{corpus}_{p.parent.name}",
                     "gender": "unknown", "emotion": "neutral", "duration_s": dur, "sample_rate": rate,
                     "channels": ch})
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


@pytest.fixture(name="manifest_rows")
def manifest_rows_fixture():
    """The :func:`manifest_rows` helper, as a fixture (test modules do not import conftest)."""
    return manifest_rows


@pytest.fixture
def make_manifest(tmp_path):
    """``make_manifest(paths, name="m.csv", **kw)`` -> path of a manifest CSV."""

    def _make(paths, name: str = "manifest.csv", **kw) -> Path:
        out = tmp_path / name
        manifest_rows(paths, **kw).to_csv(out, index=False)
        return out

    return _make


@pytest.fixture(scope="session")
def direct_forward(tiny_encoder_dir):
    """Reference: the HF model and feature extractor used directly, one utterance, no padding -> [L, T, H]."""
    import torch
    from transformers import AutoFeatureExtractor, AutoModel

    model = AutoModel.from_pretrained(tiny_encoder_dir).eval()
    fe = AutoFeatureExtractor.from_pretrained(tiny_encoder_dir)

    def _forward(wave: np.ndarray) -> np.ndarray:
        x = fe(wave, sampling_rate=16000, return_tensors="pt")["input_values"]
        with torch.no_grad():
            return torch.stack(model(x, output_hidden_states=True).hidden_states, 1)[0].numpy()

    return _forward


@pytest.fixture
def synth_files(tmp_path, write_audio):
    """Six synthetic 16 kHz clips of mixed lengths (two share a length), in two speaker folders."""
    spec = [0.8, 1.3, 1.3, 0.55, 2.1, 1.0]
    return [write_audio(tmp_path / "audio" / f"spk{i % 2}" / f"u{i}.wav", seconds=s, f0=120 + 20 * i, seed=i)
            for i, s in enumerate(spec)]


@pytest.fixture
def run_probe():
    """``run_probe(code, *args, env=None)`` -> the last number a fresh ``python -c code args`` prints (a process of
    its own: what it measures, its heap, faults or caches, starts clean)."""
    def run(code: str, *args: str, env: dict | None = None) -> float:
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, env=env)
        return float(out.stdout.split()[-1])
    return run


@pytest.fixture
def corrupt_frames():
    """``corrupt_frames(shard, uid)``: overwrite bytes in the middle of an utterance's first frames chunk, in place
    (as a disk fault would)."""
    def corrupt(shard, uid: str) -> None:
        with h5py.File(shard) as f:
            info = f["utterances"][escape_id(uid)]["frames"].id.get_chunk_info(0)
        with open(shard, "r+b") as raw:
            raw.seek(info.byte_offset + info.size // 2)
            raw.write(b"\x7f" * min(16, info.size // 2))

    return corrupt
