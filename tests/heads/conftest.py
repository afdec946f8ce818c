"""A synthetic, separable experiment: manifest, 3-fold speaker split and a feature store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.store import write_store
from pipeline.split import describe, make_split

LABELS = ["neutral", "happy", "sad", "angry"]  # label set "four"
SPEAKERS = [f"syn_{i:02d}" for i in range(1, 7)]


def write_split(path: Path, manifest: pd.DataFrame) -> Path:
    """3 speaker-group folds by ``pipeline.split``: fold k tests group k and validates on group k+1."""
    splits = make_split(manifest, scheme="speaker_kfold", n_folds=3)
    splits.to_csv(path, index=False)
    path.with_suffix(".json").write_text(json.dumps(describe(splits, manifest, scheme="speaker_kfold", seed=0)))
    return path


def make_experiment(root: Path, *, per_class: int = 6, layers: int = 2, dim: int = 8, seed: int = 0):
    """Write ``manifest.csv``, ``splits.csv`` and ``features.h5``; class c raises dimension c of layer 1."""
    rng = np.random.default_rng(seed)
    rows, entries = [], {}
    for s, speaker in enumerate(SPEAKERS):
        offset = rng.normal(0, 0.2, size=dim)  # speaker effect on every layer
        for c, emotion in enumerate(LABELS):
            for k in range(per_class):
                uid = f"syn/{speaker}/{emotion}_{k}"
                t = int(rng.integers(20, 41))
                x = rng.normal(0, 1, size=(layers, t, dim)) + offset
                x[-1, :, c] += 3.0
                entries[uid] = (x.astype(np.float32), None)
                rows.append({"id": uid, "path": f"/nonexistent/{uid}.wav", "corpus": "syn", "speaker": speaker,
                             "gender": "female" if s % 2 else "male", "emotion": emotion,
                             "duration_s": t / 50, "sample_rate": 16000, "channels": 1})
    manifest = pd.DataFrame(rows)
    manifest.to_csv(root / "manifest.csv", index=False)
    write_split(root / "splits.csv", manifest)
    write_store(root / "features.h5", entries, {"kind": "wav2vec2", "encoder": "synthetic"})
    return root / "manifest.csv", root / "splits.csv", root / "features.h5"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """``(manifest, split, features)`` paths of the synthetic experiment."""
    return make_experiment(tmp_path_factory.mktemp("syn"))
