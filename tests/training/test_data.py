"""Streaming batches and the bounded cache."""

from __future__ import annotations

import numpy as np

from pipeline.normalisation import Normaliser
from training.data import LRUCache, batches


def _reader(arrays):
    return lambda uid: arrays[uid]


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
