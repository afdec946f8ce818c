"""A synthetic experiment for the baselines: audio whose pitch gives the class, and a feature store whose
utterance-level features are separable."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from features.store import write_store
from pipeline.audio import write_audio
from pipeline.split import describe, make_split

LABELS = ["neutral", "happy", "sad", "angry"]  # label set "four"
F0 = {"neutral": 110.0, "happy": 260.0, "sad": 160.0, "angry": 380.0}


def _voice(f0: float, rng: np.random.Generator, seconds: float = 0.8, rate: int = 16000) -> np.ndarray:
    """Five harmonics of ``f0`` with a syllable envelope and a little noise."""
    t = np.arange(int(seconds * rate)) / rate
    x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6)) * (0.55 - 0.45 * np.cos(2 * np.pi * 3 * t))
    return (0.2 * x + 0.005 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def baseline_experiment(tmp_path_factory):
    """``(manifest, split, features)`` paths: 6 speakers x 4 classes x 4 utterances, 3 speaker folds."""
    root = tmp_path_factory.mktemp("baselines")
    rng = np.random.default_rng(0)
    rows, entries = [], {}
    for s in range(6):
        speaker = f"syn_{s + 1:02d}"
        shift = 1.0 + 0.05 * (s - 2.5)  # each speaker's pitch a little different
        for c, emotion in enumerate(LABELS):
            for k in range(4):
                uid = f"syn/{speaker}/{emotion}_{k}"
                path = root / "audio" / f"{speaker}_{emotion}_{k}.wav"
                path.parent.mkdir(exist_ok=True)
                write_audio(path, _voice(F0[emotion] * shift, rng), 16000)
                pooled = rng.normal(0, 1, (1, 10)).astype(np.float32)
                pooled[0, c] += 6.0
                entries[uid] = (rng.normal(0, 1, (1, 5, 3)).astype(np.float32), pooled)
                rows.append({"id": uid, "path": str(path), "corpus": "syn", "speaker": speaker,
                             "gender": "female" if s % 2 else "male", "emotion": emotion, "duration_s": 0.8,
                             "sample_rate": 16000, "channels": 1})
    manifest = pd.DataFrame(rows)
    manifest.to_csv(root / "manifest.csv", index=False)
    splits = make_split(manifest, scheme="speaker_kfold", n_folds=3)
    splits.to_csv(root / "splits.csv", index=False)
    (root / "splits.json").write_text(json.dumps(describe(splits, manifest, scheme="speaker_kfold", seed=0)))
    write_store(root / "features.h5", entries, {"kind": "egemaps", "layers": [0]})
    return root / "manifest.csv", root / "splits.csv", root / "features.h5"
