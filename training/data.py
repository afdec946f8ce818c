"""Frame readers and batches for the training loop: streamed from a feature store, cached, normalised.

A *reader* maps an utterance id to its frames ``[L, T, H]`` float32 (:class:`StoreFrames` reads the chosen
layers from an open :class:`features.store.FeatureStore`; ``baselines.mfcc_cnn`` computes log-mel frames
from audio). :class:`LRUCache` keeps recently read utterances up to a byte budget, so a small store is read
once and a large one streams in bounded memory. :func:`batches` pads, optionally crops and normalises.

Example:
    >>> with FeatureStore("egemaps.h5") as store:                                    # doctest: +SKIP
    ...     read = LRUCache(StoreFrames(store, [0]), max_bytes=2**30)
    ...     norm = Normaliser.fit("global", read, fold.train)
    ...     for x, lengths, y in batches(fold.train, labels, read, norm, batch_size=32): ...
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from features.store import FeatureStore
from pipeline.normalisation import Normaliser, Reader


class StoreFrames:
    """Read ``[L, T, H]`` float32 frames of chosen layers from an open feature store.

    Args:
        store: an open ``features.store.FeatureStore``.
        layers: layer indices, in the order the model sees them.
    """

    def __init__(self, store, layers: Sequence[int]):
        self.store, self.layers = store, list(layers)

    def __call__(self, uid: str) -> np.ndarray:
        """Frames ``[L, T, H]`` of ``uid``.

        Raises:
            ValueError: NaN or infinite values (a corrupt store): training on them would end at chance
                without a word, so the utterance and the store are named instead.
        """
        x = np.stack([np.asarray(self.store.frames(uid, layer), dtype=np.float32) for layer in self.layers])
        if not np.isfinite(x).all():
            raise ValueError(f"{getattr(self.store, 'path', 'feature store')}: utterance {uid!r} has "
                             f"{int((~np.isfinite(x)).sum())} NaN or infinite values in layers {self.layers}; "
                             "expected finite features (the store is corrupt). Delete the store (or that entry) "
                             "and extract again.")
        return x


class LRUCache:
    """Wrap a reader, keeping the most recently read arrays up to ``max_bytes`` (0 disables caching)."""

    def __init__(self, reader: Reader, *, max_bytes: int):
        self.reader, self.max_bytes = reader, max_bytes
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0

    def __call__(self, uid: str) -> np.ndarray:
        if uid in self._items:
            self._items.move_to_end(uid)
            return self._items[uid]
        x = self.reader(uid)
        if x.nbytes <= self.max_bytes:
            self._items[uid] = x
            self._bytes += x.nbytes
            while self._bytes > self.max_bytes:
                self._bytes -= self._items.popitem(last=False)[1].nbytes
        return x


def preload(read: Reader, ids: Sequence[str], normalise: Normaliser, *, max_bytes: int,
            speakers: Mapping[str, str] | None = None) -> dict[str, np.ndarray] | None:
    """Every id's normalised frames in memory, read once, when they fit in ``max_bytes``; else ``None``.

    Small stores (eGeMAPS frames, log-mels, a small encoder's states) are then read and normalised once per
    fold instead of at every step; normalising is element-wise, so cropping the normalised frames gives exactly
    the batches that normalising each crop gives. Large stores return ``None`` and keep streaming.
    """
    frames, total = {}, 0
    for uid in dict.fromkeys(ids):
        x = normalise(read(uid), speakers[uid] if speakers is not None else None)
        total += x.nbytes
        if total > max_bytes:
            return None
        frames[uid] = np.ascontiguousarray(x, dtype=np.float32)
    return frames


def collate(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``[L, T_i, H]`` arrays to ``features [B, L, T, H]`` and ``lengths [B]``."""
    lengths = [a.shape[1] for a in arrays]
    out = np.zeros((len(arrays), arrays[0].shape[0], max(lengths), arrays[0].shape[2]), dtype=np.float32)
    for b, a in enumerate(arrays):
        out[b, :, : a.shape[1]] = a
    return torch.from_numpy(out), torch.tensor(lengths, dtype=torch.int64)


def batches(ids: Sequence[str], y: np.ndarray, read: Reader, normalise: Normaliser, *, batch_size: int,
            speakers: Mapping[str, str] | None = None, max_frames: int | None = None,
            rng: np.random.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(features [B, L, T, H], lengths [B], y [B])`` in the order of ``ids``.

    Args:
        ids, y: utterances and their class ids.
        read: the reader.
        normalise: applied per utterance before padding.
        batch_size: ``B``.
        speakers: id to speaker (``speaker`` normalisation).
        max_frames: crop longer utterances to this many frames: at a random offset drawn from ``rng`` when
            given (training), else centred (evaluation).
        rng: the generator for crop offsets.
    """
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        arrays = []
        for uid in chunk:
            x = read(uid)
            if max_frames and x.shape[1] > max_frames:
                extra = x.shape[1] - max_frames
                offset = int(rng.integers(0, extra + 1)) if rng is not None else extra // 2
                x = x[:, offset:offset + max_frames]
            arrays.append(normalise(x, speakers[uid] if speakers is not None else None))
        features, lengths = collate(arrays)
        yield features, lengths, torch.as_tensor(y[start:start + batch_size], dtype=torch.int64)


def store_reader(path: str, layers: Sequence[int], cache_mb: int) -> Reader:
    """A cached reader of ``layers`` from the store at ``path`` (opened in the calling process)."""
    return LRUCache(StoreFrames(FeatureStore(path), layers), max_bytes=cache_mb * 2**20)
