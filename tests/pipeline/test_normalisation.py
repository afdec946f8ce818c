"""Normalisation fitted on training speakers only (frames), and per-speaker z-scoring (rows)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.normalisation import Normaliser, frame_stats, speaker_standardise


def _reader(arrays):
    return lambda uid: arrays[uid]


def test_global_normaliser_uses_only_training_ids():
    rng = np.random.default_rng(0)
    arrays = {"train_a": rng.normal(1, 2, (2, 10, 3)), "train_b": rng.normal(1, 2, (2, 6, 3)),
              "test": rng.normal(50, 9, (2, 8, 3))}
    norm = Normaliser.fit("global", _reader(arrays), ["train_a", "train_b"])
    frames = np.concatenate([arrays["train_a"], arrays["train_b"]], axis=1)
    mean, std = norm.stats[""]
    np.testing.assert_allclose(mean, frames.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(std, frames.std(axis=1), rtol=1e-4)
    assert norm.fitted_on == ["train_a", "train_b"]
    restored = Normaliser.from_dict(norm.to_dict())
    np.testing.assert_allclose(restored(arrays["test"]), norm(arrays["test"]))


def test_speaker_normaliser_uses_each_speakers_statistics():
    rng = np.random.default_rng(1)
    arrays = {"a1": rng.normal(5, 1, (1, 9, 2)), "a2": rng.normal(5, 1, (1, 4, 2)),
              "b1": rng.normal(-3, 2, (1, 7, 2))}
    speakers = {"a1": "A", "a2": "A", "b1": "B"}
    norm = Normaliser.fit("speaker", _reader(arrays), ["a1"], speakers=speakers, all_ids=list(arrays))
    np.testing.assert_allclose(norm.stats["B"][0], arrays["b1"].mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(norm(arrays["b1"], "B").mean(axis=1), 0.0, atol=1e-5)
    assert norm.to_dict() == {"mode": "speaker"}


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="unknown normalisation 'minmax'"):
        Normaliser.fit("minmax", _reader({}), [])


def test_frame_stats_floor_constant_dimensions():
    mean, std = frame_stats(_reader({"a": np.full((1, 5, 2), 3.0)}), ["a"])
    assert np.all(std > 0) and np.allclose(mean, 3.0)


def test_speaker_standardise_uses_each_speakers_rows():
    X = np.array([[1.0, 10], [3, 30], [100, 0], [300, 2]])
    out = speaker_standardise(X, np.array(["a", "a", "b", "b"]))
    np.testing.assert_allclose(out, [[-1, -1], [1, 1], [-1, -1], [1, 1]])
