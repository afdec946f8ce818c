"""The HDF5 feature store: one layout for wav2vec2-family hidden states and for eGeMAPS, and its reader.

Layout (format ``ser-features/1``)::

    /                           attrs: format = "ser-features/1", meta = JSON object (see below)
    /utterances/<name>          one group per utterance; <name> = escape_id(id) ("/" -> "%2F", "%" -> "%25")
        attrs: id (the manifest id), num_frames, source (content hash of the audio), duration_s, ...
        frames   [L, T, H]      storage dtype (float16 by default for wav2vec2, float32 for eGeMAPS),
                                contiguous layer-major, so one layer is one contiguous read
        pooled   [L, D]         float32; wav2vec2: per-layer mean ‖ std over frames (D = 2H, std with
                                ddof=0, computed from the float32 frames before storage rounding);
                                eGeMAPS: the 88 functionals (L = 1)

``meta`` holds the feature settings: ``kind`` ("wav2vec2" for any Hugging Face encoder, "egemaps"),
``encoder``, ``revision``, ``sample_rate``, ``layers`` (hidden-state indices stored, in order; ``frames(uid, i)``
is ``layers[i]``), ``dtype`` (compute), ``storage_dtype``, ``max_seconds``, ``offset_seconds``, ``versions``
and, for eGeMAPS, ``functional_names`` and ``lld_names``. Writers produce a whole file under a temporary
name and ``os.replace`` it, so a reader never sees a half-written store.

Example:
    >>> with FeatureStore("data/features/wav2vec2.h5") as fs:     # doctest: +SKIP
    ...     x = fs.frames(fs.ids()[0], 12)                          # [T, 768]
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

FORMAT = "ser-features/1"

#: Settings filled in by :func:`write_store` when the caller leaves them out.
DEFAULT_ATTRS = {"kind": "wav2vec2", "encoder": "synthetic", "revision": None, "sample_rate": 16000,
                 "dtype": "float32", "storage_dtype": "float32", "max_seconds": None,
                 "offset_seconds": 0.0, "versions": {}}


def escape_id(uid: str) -> str:
    """Turn a manifest id into an HDF5 group name ("/" is the HDF5 path separator)."""
    name = uid.replace("%", "%25").replace("/", "%2F")
    return "%2E" + name[1:] if name.startswith(".") else name


def unescape_id(name: str) -> str:
    """Inverse of :func:`escape_id`."""
    if name.startswith("%2E"):
        name = "." + name[3:]
    return name.replace("%2F", "/").replace("%25", "%")


class FeatureStore:
    """Read-only access to a feature store; datasets are read on demand, never the whole file.

    Args:
        path: the ``.h5`` file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a feature store of this format.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no feature store here; expected the output of "
                                    "`python -m features.extract` or `python -m features.egemaps`.")
        self._h5 = h5py.File(self.path, "r")
        if self._h5.attrs.get("format") != FORMAT or "utterances" not in self._h5:
            found = self._h5.attrs.get("format")
            self._h5.close()
            raise ValueError(f"{self.path}: expected a feature store of format {FORMAT!r}, found "
                             f"{found!r}. Rebuild it with `python -m features.extract`.")
        self.attrs: dict = json.loads(self._h5.attrs["meta"])
        self._utts = self._h5["utterances"]

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._h5.close()

    @property
    def num_layers(self) -> int:
        """Number of stored layers ``L`` (13 for all of wav2vec2-base, 1 for eGeMAPS)."""
        return len(self.attrs["layers"])

    def layer_positions(self, layers: Sequence[int] | None) -> list[int]:
        """Positions in the stored layers to use: all when ``layers`` is empty or None, else checked.

        Raises:
            ValueError: a position outside ``0 .. num_layers - 1``.
        """
        used = list(range(self.num_layers)) if not layers else [int(i) for i in layers]
        bad = [i for i in used if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"--layers {bad}: expected positions 0..{self.num_layers - 1} of the store's "
                             f"layers {self.attrs['layers']}.")
        return used

    def ids(self) -> list[str]:
        """Utterance ids (the manifest's ``id``), sorted by their escaped names."""
        return [unescape_id(name) for name in self._utts]

    def __contains__(self, uid: str) -> bool:
        return escape_id(uid) in self._utts

    def __len__(self) -> int:
        return len(self._utts)

    def _group(self, uid: str) -> h5py.Group:
        try:
            return self._utts[escape_id(uid)]
        except KeyError:
            raise KeyError(f"{uid!r} is not in {self.path} ({len(self)} utterances); expected an id of the "
                           "manifest it was extracted from. Re-run extraction on that manifest.") from None

    def num_frames(self, uid: str) -> int:
        """Number of frames ``T`` of one utterance."""
        return int(self._group(uid)["frames"].shape[1])

    def frames(self, uid: str, layer: int) -> np.ndarray:
        """Frame-level features of one stored layer.

        Args:
            uid: utterance id.
            layer: position in ``attrs["layers"]`` (``0 <= layer < num_layers``), not the hidden-state index.

        Returns:
            ``[T, H]`` float32.
        """
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer}: expected 0 <= layer < {self.num_layers} (stored hidden states "
                             f"{self.attrs['layers']}); pass a position in attrs['layers'].")
        return self._group(uid)["frames"][layer].astype(np.float32, copy=False)

    def all_frames(self, uid: str) -> np.ndarray:
        """Every stored layer of one utterance, ``[L, T, H]`` float32."""
        return self._group(uid)["frames"][()].astype(np.float32, copy=False)

    def pooled(self, uid: str) -> np.ndarray:
        """Utterance-level features: ``[L, 2H]`` mean ‖ std per layer (eGeMAPS: ``[1, 88]``), float32."""
        return self._group(uid)["pooled"][()].astype(np.float32, copy=False)

    def frames_extent(self, uid: str) -> tuple[int, int] | None:
        """``(offset, bytes)`` of an utterance's frames in the file, or None where they are not stored whole."""
        data = self._group(uid)["frames"].id
        offset = data.get_offset()
        return None if offset is None else (offset, data.get_storage_size())

    def entry_attrs(self, uid: str) -> dict:
        """Per-utterance attributes (``id``, ``num_frames``, ``source``, ``duration_s``, ...)."""
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self._group(uid).attrs.items()}


def mean_std(frames: np.ndarray) -> np.ndarray:
    """Per-layer mean ‖ std (ddof=0) over time: ``[L, T, H]`` -> ``[L, 2H]`` float32."""
    x = np.asarray(frames, dtype=np.float64)
    return np.concatenate([x.mean(axis=1), x.std(axis=1)], axis=-1).astype(np.float32)


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x.astype(dtype)``; float32 -> float16 through torch when it is loaded (10x faster than numpy's)."""
    torch = sys.modules.get("torch")
    if torch is not None and dtype == np.float16 and x.dtype == np.float32:
        return torch.from_numpy(np.ascontiguousarray(x)).half().numpy()
    return x.astype(dtype, copy=False)


class _Moments:
    """Streaming per-layer mean and variance (Chan et al.'s pairwise merge), float64."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, piece: np.ndarray) -> None:  # piece [L, t, H]
        n_b = piece.shape[1]
        torch = sys.modules.get("torch")
        if torch is not None and piece.dtype == np.float32:  # two float32 passes in torch: 6x faster, ~1e-7 apart
            x = torch.from_numpy(np.ascontiguousarray(piece))
            mean = x.mean(dim=1, keepdim=True)
            mean_b, m2_b = mean[:, 0].double().numpy(), (x - mean).square_().sum(dim=1).double().numpy()
        else:
            mean_b = piece.mean(axis=1, dtype=np.float64)
            m2_b = piece.var(axis=1, dtype=np.float64) * n_b
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * n_b / n)
        self.n = n

    def pooled(self) -> np.ndarray:
        return np.concatenate([self.mean, np.sqrt(self.m2 / self.n)], axis=-1).astype(np.float32)


class StoreWriter:
    """Write a new store file (the caller renames it into place; see :func:`atomic_path`).

    Args:
        path: file to create (overwritten).
        attrs: the store's settings (``meta``); must contain ``layers`` and ``storage_dtype``.
    """

    def __init__(self, path: str | os.PathLike, attrs: Mapping):
        self.path = Path(path)
        self.attrs = dict(attrs)
        self.storage_dtype = np.dtype(self.attrs["storage_dtype"])
        self._h5 = h5py.File(path, "w")
        self._h5.attrs["format"] = FORMAT
        self._h5.attrs["meta"] = json.dumps(self.attrs)
        self._utts = self._h5.create_group("utterances")

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._h5.id.valid:
            self._h5.flush()
            self._h5.close()

    def sync(self) -> None:
        """Flush what is written so far and wait until the disk has it (the file stays open)."""
        self._h5.flush()
        with open(self.path, "rb") as f:
            os.fdatasync(f.fileno())

    def add(self, uid: str, frames: np.ndarray, pooled: np.ndarray | None = None, **meta) -> None:
        """Add one utterance: ``frames [L, T, H]``; ``pooled [L, D]`` (mean ‖ std of ``frames`` when None)."""
        frames = np.asarray(frames)
        self.add_pieces(uid, [frames], num_frames=frames.shape[1], hidden_size=frames.shape[2],
                        pooled=pooled, **meta)

    def add_pieces(self, uid: str, pieces: Iterable[np.ndarray], *, num_frames: int, hidden_size: int,
                   pooled: np.ndarray | None = None, **meta) -> None:
        """Add one utterance whose frames arrive as consecutive ``[L, t, H]`` pieces (bounded memory).

        Raises:
            ValueError: the pieces do not add up to ``num_frames`` frames of ``len(attrs["layers"])``
                layers, or a value does not fit the storage dtype.
        """
        if num_frames < 1:
            raise ValueError(f"{uid}: expected at least one frame, found {num_frames}.")
        group = self._utts.create_group(escape_id(uid))
        try:
            self._fill(uid, group, pieces, num_frames, hidden_size, pooled)
        except BaseException:
            del self._utts[escape_id(uid)]  # never leave a half-written entry behind
            raise
        group.attrs.update({"id": uid, "num_frames": num_frames, **{k: v for k, v in meta.items() if v is not None}})

    def _fill(self, uid: str, group: h5py.Group, pieces: Iterable[np.ndarray], num_frames: int, hidden_size: int,
              pooled: np.ndarray | None) -> None:
        n_layers = len(self.attrs["layers"])
        # every element is written below, so no fill pass (HDF5 would otherwise write the whole dataset twice)
        data = group.create_dataset("frames", shape=(n_layers, num_frames, hidden_size), dtype=self.storage_dtype,
                                    fill_time="never")
        moments, at = _Moments(), 0
        for piece in pieces:
            if piece.shape[0] != n_layers or piece.shape[2] != hidden_size or at + piece.shape[1] > num_frames:
                raise ValueError(f"{uid}: piece of shape {piece.shape} at frame {at} does not fit "
                                 f"[{n_layers}, {num_frames}, {hidden_size}].")
            if piece.size and not (np.isfinite(hi := piece.max()) and np.isfinite(lo := piece.min())
                                   and max(hi, -lo) <= np.finfo(self.storage_dtype).max):
                raise ValueError(f"{uid}: values out of {self.storage_dtype} range (max |x| = "
                                 f"{np.abs(piece).max():.4g}); expected finite features. "
                                 "Store as float32 (--storage-dtype float32).")
            stored = np.ascontiguousarray(_cast(piece, self.storage_dtype))
            data.write_direct(stored, dest_sel=np.s_[:, at:at + piece.shape[1]])  # 5x faster than data[sel] = ...
            if pooled is None:
                moments.update(piece)
            at += piece.shape[1]
        if at != num_frames:
            raise ValueError(f"{uid}: expected {num_frames} frames, the pieces held {at}.")
        group.create_dataset("pooled", data=np.asarray(moments.pooled() if pooled is None else pooled,
                                                       dtype=np.float32))

    def copy_entry(self, src: FeatureStore, uid: str) -> None:
        """Copy one utterance's group unchanged from another store (HDF5-level copy, no decoding)."""
        src._h5.copy(src._group(uid), self._utts, name=escape_id(uid))


def temporary_sibling(path: Path) -> Path:
    """``<path>.tmp-<pid>``: where a new version of ``path`` is written (the pid tells a live writer's file
    from a killed one's garbage)."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def replace_synced(tmp: Path, target: Path) -> None:
    """fsync a closed file, then rename it onto ``target`` (atomic: ``target`` is old or new, never partial)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success :func:`replace_synced` it onto ``path``.

    On an exception (or a kill) the target is untouched; a leftover ``*.tmp-<pid>`` is garbage.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        replace_synced(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_store(path: str | os.PathLike, entries: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
                attrs: Mapping | None = None) -> Path:
    """Write a complete store at once, atomically (handy for building small synthetic stores in tests).

    Args:
        path: the ``.h5`` file to (over)write.
        entries: ``{uid: (frames [L, T, H], pooled [L, D] or None)}``; None pools as mean ‖ std ``[L, 2H]``.
        attrs: store settings; missing keys are taken from :data:`DEFAULT_ATTRS` and ``layers`` defaults
            to ``list(range(L))``.

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> write_store(tmp / "f.h5", {"c/a": (np.ones((2, 5, 4)), None)}, {})   # doctest: +SKIP
    """
    first = next(iter(entries.values()), (np.zeros((1, 1, 1)), None))[0]
    meta = {**DEFAULT_ATTRS, "layers": list(range(np.shape(first)[0])), **(attrs or {})}
    with atomic_path(path) as tmp, StoreWriter(tmp, meta) as writer:
        for uid, (frames, pooled) in entries.items():
            writer.add(uid, frames, pooled)
    return Path(path)
