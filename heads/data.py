"""Frame batches streamed from a feature store, with normalisation fitted on training speakers only.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

Reader = Callable[[str], np.ndarray]
NORMALISATIONS = ("global", "speaker", "none")
_STD_FLOOR = 1e-5


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


def frame_stats(read: Reader, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std ``[L, H]`` over every frame of ``ids``, in one streaming pass (float64 sums)."""
    total = total_sq = None
    count = 0
    for uid in ids:
        x = read(uid).astype(np.float64)
        s, sq = x.sum(axis=1), np.square(x).sum(axis=1)
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
        count += x.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return mean.astype(np.float32), np.maximum(std, _STD_FLOOR).astype(np.float32)


@dataclass
class Normaliser:
    """Per-layer, per-dimension standardisation.

    ``global`` uses one mean/std fitted on the training utterances only; ``speaker`` uses each speaker's own
    statistics (the test speakers' included: outputs label such runs); ``none`` leaves frames as they are.

    Attributes:
        mode: one of :data:`NORMALISATIONS`.
        stats: ``{key: (mean [L, H], std [L, H])}``; key ``""`` for ``global``, the speaker for ``speaker``.
        fitted_on: the ids the statistics came from (``global``), for checks.
    """

    mode: str
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    fitted_on: list[str] = field(default_factory=list)

    @classmethod
    def fit(cls, mode: str, read: Reader, train_ids: Sequence[str], *,
            speakers: Mapping[str, str] | None = None, all_ids: Sequence[str] = ()) -> Normaliser:
        """Fit ``global`` statistics on ``train_ids``, or ``speaker`` statistics per speaker of ``all_ids``.

        Raises:
            ValueError: unknown mode, or ``speaker`` without ``speakers``.
        """
        if mode not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {mode!r}; expected one of {NORMALISATIONS}.")
        if mode == "global":
            return cls(mode, {"": frame_stats(read, train_ids)}, list(train_ids))
        if mode == "speaker":
            if speakers is None:
                raise ValueError("speaker normalisation needs each id's speaker; pass speakers={id: speaker}.")
            groups: dict[str, list[str]] = {}
            for uid in all_ids:
                groups.setdefault(speakers[uid], []).append(uid)
            return cls(mode, {spk: frame_stats(read, ids) for spk, ids in sorted(groups.items())}, list(all_ids))
        return cls(mode)

    def __call__(self, x: np.ndarray, speaker: str | None = None) -> np.ndarray:
        """Standardise ``[L, T, H]`` frames (``speaker`` picks the statistics in ``speaker`` mode)."""
        if self.mode == "none":
            return x
        mean, std = self.stats["" if self.mode == "global" else speaker]
        return (x - mean[:, None, :]) / std[:, None, :]

    def to_dict(self) -> dict:
        """JSON-ready form; ``speaker`` statistics are not kept (a new speaker brings its own)."""
        if self.mode != "global":
            return {"mode": self.mode}
        mean, std = self.stats[""]
        return {"mode": self.mode, "mean": mean.tolist(), "std": std.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> Normaliser:
        if data["mode"] != "global":
            return cls(data["mode"])
        return cls("global", {"": (np.asarray(data["mean"], np.float32), np.asarray(data["std"], np.float32))})


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
