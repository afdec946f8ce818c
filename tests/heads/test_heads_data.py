"""Streaming batches, the bounded cache and normalisation fitted on training speakers only."""

from __future__ import annotations

import numpy as np
import pytest

from heads.data import LRUCache, Normaliser, batches, frame_stats


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


def test_lru_cache_stays_within_budget():
    calls = []
    arrays = {str(i): np.zeros((1, 10, 10), np.float32) for i in range(5)}  # 400 bytes each

    def read(uid):
        calls.append(uid)
        return arrays[uid]

    cache = LRUCache(read, max_bytes=1000)
    for uid in ["0", "1", "0", "2", "0", "1"]:
        cache(uid)
    assert calls == ["0", "1", "2", "1"]  # "0" was used recently, so "1" was evicted when "2" came
    assert sum(a.nbytes for a in cache._items.values()) <= 1000


def test_batches_pad_crop_and_keep_order():
    arrays = {"a": np.ones((2, 10, 3), np.float32), "b": np.ones((2, 4, 3), np.float32)}
    norm = Normaliser("none")
    (x, lengths, y), = batches(["a", "b"], np.array([1, 0]), _reader(arrays), norm, batch_size=4, max_frames=6)
    assert x.shape == (2, 2, 6, 3) and lengths.tolist() == [6, 4] and y.tolist() == [1, 0]
    assert float(x[1, :, 4:].abs().sum()) == 0.0


def test_frame_stats_floor_constant_dimensions():
    mean, std = frame_stats(_reader({"a": np.full((1, 5, 2), 3.0)}), ["a"])
    assert np.all(std > 0) and np.allclose(mean, 3.0)
