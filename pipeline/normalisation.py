"""Standardising features: the normalisation choices and the statistics behind them.

``global`` standardises with one mean/std fitted on a fold's training utterances only; ``speaker`` uses each
speaker's own statistics (the test speakers' included, so runs that use it are labelled so); ``none`` leaves
features as they are. :class:`Normaliser` applies it to frames ``[L, T, H]`` (the heads, the MFCC-CNN),
:func:`speaker_standardise` to utterance-level rows ``[N, D]`` (the scikit-learn baselines, before their own
scaler).

Example:
    >>> norm = Normaliser.fit("global", read, fold.train)     # doctest: +SKIP
    >>> norm(read(uid)).shape                                  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

#: A reader maps an utterance id to its frames ``[L, T, H]`` float32.
Reader = Callable[[str], np.ndarray]
_STD_FLOOR = 1e-5


class Normalisation(StrEnum):
    """How features are standardised before a model sees them."""

    GLOBAL = "global"    # statistics of the fold's training utterances
    SPEAKER = "speaker"  # each speaker's own statistics, test speakers included
    NONE = "none"        # as they are

    @classmethod
    def parse(cls, value: str, allowed: Sequence[Normalisation] | None = None) -> Normalisation:
        """The member named ``value``, refused with the choices when unknown (or not in ``allowed``).

        Raises:
            ValueError: naming the value and the choices.
        """
        choices = list(allowed or cls)
        if value not in choices:
            raise ValueError(f"unknown normalisation {value!r}; expected one of {[str(c) for c in choices]}.")
        return cls(value)


def speaker_standardise(X: np.ndarray, groups: np.ndarray | None = None, *, eps: float = _STD_FLOOR) -> np.ndarray:
    """Z-score the rows ``X [N, D]`` of each speaker (``groups [N]``; ``None``: one speaker) with its own
    mean and std (``speaker`` normalisation of utterance-level features)."""
    X = np.asarray(X, dtype=np.float64)
    groups = np.zeros(len(X)) if groups is None else np.asarray(groups)
    out = np.empty_like(X)
    for g in np.unique(groups):
        rows = groups == g
        out[rows] = (X[rows] - X[rows].mean(axis=0)) / np.maximum(X[rows].std(axis=0), eps)
    return out


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
        mode: a :class:`Normalisation`.
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
        mode = Normalisation.parse(mode)
        if mode == Normalisation.GLOBAL:
            return cls(mode, {"": frame_stats(read, train_ids)}, list(train_ids))
        if mode == Normalisation.SPEAKER:
            if speakers is None:
                raise ValueError("speaker normalisation needs each id's speaker; pass speakers={id: speaker}.")
            groups: dict[str, list[str]] = {}
            for uid in all_ids:
                groups.setdefault(speakers[uid], []).append(uid)
            return cls(mode, {spk: frame_stats(read, ids) for spk, ids in sorted(groups.items())}, list(all_ids))
        return cls(mode)

    def __call__(self, x: np.ndarray, speaker: str | None = None) -> np.ndarray:
        """Standardise ``[L, T, H]`` frames (``speaker`` picks the statistics in ``speaker`` mode)."""
        if self.mode == Normalisation.NONE:
            return x
        mean, std = self.stats["" if self.mode == Normalisation.GLOBAL else speaker]
        return (x - mean[:, None, :]) / std[:, None, :]

    def to_dict(self) -> dict:
        """JSON-ready form; ``speaker`` statistics are not kept (a new speaker brings its own)."""
        if self.mode != Normalisation.GLOBAL:
            return {"mode": self.mode}
        mean, std = self.stats[""]
        return {"mode": self.mode, "mean": mean.tolist(), "std": std.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> Normaliser:
        if data["mode"] != Normalisation.GLOBAL:
            return cls(data["mode"])
        mean, std = np.asarray(data["mean"], np.float32), np.asarray(data["std"], np.float32)
        return cls(Normalisation.GLOBAL, {"": (mean, std)})
