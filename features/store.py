"""The feature store: append-only HDF5 shards kept per feature settings, one layout for wav2vec2-family hidden
states and for eGeMAPS, and its reader.

Layout (format ``ser-features/2``)::

    <out>/                      a collection: the path given to ``--out`` (e.g. data/features/wav2vec2.h5)
        current.json            {"format", "store": "<identity dir>", "entries": {uid: source}}: the view of the
                                last successful run, rewritten atomically and only when it changes
        <slug>/                 one identity store, e.g. wav2vec2-base-float32-1a2b3c4d5e6f
            store.json          {"format", "identity": {...}}, written once when the store is created
            shards/<name>.h5    immutable HDF5 shards, each holding whole utterances (layout below)
            index.json          derived: {shard name: {"size", "mtime_ns", "entries": {uid: source},
                                "corrupt": {uid: source} (entries found damaged)}}, rewritten atomically when
                                shards are added; readers rebuild what it lacks from the shards themselves

    shard /                     attrs: format = "ser-features/2", meta = JSON (identity + versions, provenance)
        /utterances/<name>      one group per utterance; <name> = escape_id(id) ("/" -> "%2F", "%" -> "%25")
            attrs: id (the manifest id), num_frames, source (content hash of the audio), duration_s, ...
            frames   [L, T, H]  storage dtype (float16 by default for wav2vec2, float32 for eGeMAPS); chunked one
                                layer per chunk (utterances streamed in pieces: CHUNK_FRAMES frames per chunk)
            pooled   [L, D]     float32; wav2vec2: per-layer mean ‖ std over frames (D = 2H, std with
                                ddof=0, computed from the float32 frames before storage rounding);
                                eGeMAPS: the 88 functionals (L = 1)

Every dataset carries a fletcher32 checksum per chunk, and the file's own metadata (HDF5 1.10 format) its
checksums, so a shard damaged after it was written fails on read (a clear ``OSError`` naming the utterance and
the shard) instead of returning garbage.

The *identity* of a store is its feature settings: the meta dict minus :data:`RUN_KEYS` (``versions``,
``provenance``: library versions, CPU/GPU model, kernels picked, which describe a run and are kept in each
shard's ``meta``). Meta keys: ``kind`` ("wav2vec2" for any Hugging Face encoder, "egemaps"), ``encoder``,
``revision``, ``sample_rate``, ``layers`` (hidden-state indices stored, in order; ``frames(uid, i)`` is
``layers[i]``), ``dtype`` (compute), ``storage_dtype``, ``max_seconds``, ``offset_seconds``, the window settings
and, for eGeMAPS, ``functional_names`` and ``lld_names``. The identity directory's name is a readable prefix
(encoder or kind, dtype) and 12 hex digits of the SHA-256 of the canonical identity JSON: settings switched back
and forth find their store again. Shards are written under ``<name>.h5.tmp-<pid>``, fsync'd and renamed, so a
published shard is always whole; nothing published is ever modified.

Example:
    >>> with FeatureStore("data/features/wav2vec2.h5") as fs:    # doctest: +SKIP
    ...     x = fs.frames(fs.ids()[0], 12)                          # [T, 768]
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

FORMAT = "ser-features/2"
#: Meta keys that describe a run, not the features: recorded per shard, left out of the identity.
RUN_KEYS = ("versions", "provenance")
CURRENT, STORE_JSON, INDEX, SHARDS = "current.json", "store.json", "index.json", "shards"
#: In an identity store: the feature-encoder implementation and frame grid its first timing chose (first writer wins).
FEATURE_ENCODER_CHOICE = "feature-encoder.json"
#: Frames per chunk of an utterance written in pieces (whole utterances are one chunk per layer).
CHUNK_FRAMES = 1024
#: Most shard files a reader keeps open at once.
MAX_OPEN_SHARDS = 32

#: Settings filled in by :func:`write_store` when the caller leaves them out.
DEFAULT_ATTRS = {"kind": "wav2vec2", "encoder": "synthetic", "revision": None, "sample_rate": 16000,
                 "dtype": "float32", "storage_dtype": "float32", "max_seconds": None,
                 "offset_seconds": 0.0, "versions": {}}

_RERUN = ("Run the extraction that built it again with the same --out: it checks shards that changed since they "
          "were written and recomputes damaged entries (if it reports none corrupt, delete the shard first).")


def escape_id(uid: str) -> str:
    """Turn a manifest id into an HDF5 group name ("/" is the HDF5 path separator)."""
    name = uid.replace("%", "%25").replace("/", "%2F")
    return "%2E" + name[1:] if name.startswith(".") else name


def unescape_id(name: str) -> str:
    """Inverse of :func:`escape_id`."""
    if name.startswith("%2E"):
        name = "." + name[3:]
    return name.replace("%2F", "/").replace("%25", "%")


# ---------------------------------------------------------------------------------------------- identity


def _canonical(value):
    """JSON value with integral floats as ints (``max_seconds: 20`` and ``20.0`` are the same setting)."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def identity_of(meta: Mapping) -> dict:
    """The feature settings that make a store: ``meta`` minus :data:`RUN_KEYS`, as plain JSON values."""
    return json.loads(json.dumps({k: v for k, v in meta.items() if k not in RUN_KEYS}))


def identity_slug(identity: Mapping) -> str:
    """Directory name of an identity store: ``<encoder basename or kind>-<dtype>-<12 hex of its SHA-256>``."""
    digest = hashlib.sha256(json.dumps(_canonical(dict(identity)), sort_keys=True, separators=(",", ":"))
                            .encode()).hexdigest()[:12]
    name = str(identity.get("encoder") or identity.get("kind") or "features").rstrip("/\\")
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", re.split(r"[/\\]", name)[-1]).strip("-.") or "features"
    return "-".join(str(p) for p in (base, identity.get("dtype"), digest) if p)


# --------------------------------------------------------------------------------- files written atomically


def this_host() -> str:
    """This machine's name as temporary files carry it (letters, digits and ``_`` only)."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", socket.gethostname()) or "host"


def writer_tag() -> str:
    """``<host>.<pid>``: who writes a temporary file. On a filesystem several machines share, a pid means
    something only on its own host, so only this host's files of dead processes are ever deleted as debris."""
    return f"{this_host()}.{os.getpid()}"


def temporary_sibling(path: Path) -> Path:
    """``<path>.tmp-<host>.<pid>``: where a new file is written before it is renamed onto ``path`` (host and pid
    tell a live writer's file from a killed one's debris)."""
    return path.with_name(f"{path.name}.tmp-{writer_tag()}")


def hold_store(store_dir: Path):
    """A shared lock on the identity store ``store_dir`` for as long as the returned file stays open. Builds and
    readers hold one; ``features.stores remove`` takes the exclusive lock, so it never deletes a store in use.
    Returns None when the store is not there, or was removed (renamed aside) between being found and locked."""
    try:
        f = open(store_dir / STORE_JSON, "rb")
    except FileNotFoundError:
        return None
    fcntl.flock(f.fileno(), fcntl.LOCK_SH)
    try:
        if os.path.samestat(os.fstat(f.fileno()), os.stat(store_dir / STORE_JSON)):
            return f
    except FileNotFoundError:
        pass
    f.close()
    return None


def _sync_dir(path: Path) -> None:
    """fsync a directory, so that a rename in it survives a machine crash (where the platform allows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_synced(tmp: Path, target: Path) -> None:
    """fsync a closed file, rename it onto ``target`` (atomic: ``target`` is old or new, never partial), fsync the
    directory."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _sync_dir(Path(target).parent)


def write_if_changed(path: str | os.PathLike, text: str) -> bool:
    """Write ``text`` to ``path`` atomically (aside, then renamed), only if the file's content would change;
    returns whether it wrote."""
    path, data = Path(path), text.encode()
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:  # bytes: a CSV's \r\n line ends compare as written
            return False
    tmp = temporary_sibling(path)
    try:
        tmp.write_bytes(data)
        replace_synced(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def write_json(path: str | os.PathLike, obj) -> bool:
    """Write ``obj`` as JSON atomically, only if the file's content would change; returns whether it wrote."""
    return write_if_changed(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def claim_json(path: str | os.PathLike, obj: dict) -> dict:
    """First writer wins: make ``path`` hold ``obj`` unless it exists already; returns what it holds. Processes that
    decide at once (``--shard`` members on machines sharing the store) all end with the first one's decision: the
    file is written aside and hard-linked into place, which fails where it exists, so it is never seen partial.

    Raises:
        ValueError: an existing ``path`` is not a JSON object.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.link(tmp, path)
        _sync_dir(path.parent)
        return dict(obj)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return read_choice(path)


def read_choice(path: str | os.PathLike) -> dict:
    """The JSON object a :func:`claim_json` file holds.

    Raises:
        ValueError: the file cannot be read or is not a JSON object.
    """
    path = Path(path)
    try:
        held = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the recorded choice ({err}); expected a JSON object. Delete the "
                         "file to choose again.") from err
    if not isinstance(held, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(held).__name__}. Delete the file to choose "
                         "again.")
    return held


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the {what} ({err}); expected the JSON file a feature extraction "
                         "wrote. Rerun the extraction (`python -m features.extract` or `features.egemaps`).") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected a {what} of format {FORMAT!r}, found {found!r}. Rerun the "
                         "extraction (`python -m features.extract` or `features.egemaps`).")
    return data


def new_shard_name() -> str:
    """A fresh shard file name; names sort in the order they were made (newest last)."""
    return f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(2)}.h5"


# --------------------------------------------------------------------------------------------- collections


def read_current(collection: str | os.PathLike) -> dict | None:
    """A collection's ``current.json`` (``format, store, entries``), or None where no run has finished.

    Raises:
        ValueError: the file is unreadable or not of this format.
    """
    path = Path(collection) / CURRENT
    if not path.is_file():
        return None
    data = _read_json(path, "current view")
    if not isinstance(data.get("store"), str) or not isinstance(data.get("entries"), dict):
        raise ValueError(f"{path}: expected keys 'store' (a folder name) and 'entries' ({{id: source}}), found "
                         f"{sorted(data)}. Rerun the extraction.")
    return data


def write_current(collection: str | os.PathLike, store: str, entries: Mapping[str, str]) -> bool:
    """Point a collection at identity store ``store`` with the view ``{uid: source}`` (only if it changes)."""
    return write_json(Path(collection) / CURRENT, {"format": FORMAT, "store": store, "entries": dict(entries)})


def is_identity_store(path: str | os.PathLike) -> bool:
    return (Path(path) / STORE_JSON).is_file()


# ---------------------------------------------------------------------------------------------- the shards


def _shard_meta(f: h5py.File, path: Path) -> dict:
    if f.attrs.get("format") != FORMAT or "utterances" not in f:
        raise ValueError(f"{path}: expected a feature shard of format {FORMAT!r}, found {f.attrs.get('format')!r}.")
    return json.loads(f.attrs["meta"])


def _attr(value):
    return value.item() if isinstance(value, np.generic) else value


#: What reading a damaged HDF5 file raises: checksum and header errors (OSError), but damaged metadata can also
#: surface as RuntimeError (a heap's free list) or AttributeError (a group read back as None).
DAMAGE_ERRORS = (OSError, KeyError, ValueError, RuntimeError, AttributeError)


class UnreadableShard(OSError):
    """A shard that no index describes cannot be opened or listed: what it held is unknown."""


def scan_shard(path: str | os.PathLike) -> dict[str, str]:
    """``{uid: source}`` of a shard, read from its attributes only (no data is read)."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        _shard_meta(f, path)
        return {str(_attr(g.attrs["id"])): str(_attr(g.attrs.get("source", ""))) for g in f["utterances"].values()}


def verify_shard(path: str | os.PathLike, expected: Mapping[str, str] | None = None
                 ) -> tuple[dict[str, str], dict[str, str]]:
    """Read every dataset of a shard (checking its checksums), layer by layer.

    Args:
        path: the shard.
        expected: ``{uid: source}`` it was published with (from the index); None: what its attributes say.

    Returns:
        ``(good, damaged)``, each ``{uid: source}``; an unreadable shard has every expected entry damaged.

    Raises:
        UnreadableShard: ``expected`` is None (no index describes the shard) and it cannot be opened or listed.
    """
    path = Path(path)
    good: dict[str, str] = {}
    try:
        f = h5py.File(path, "r")
    except DAMAGE_ERRORS as err:
        if expected is None:
            raise UnreadableShard(f"{path}: cannot open it ({err})") from err
        return {}, dict(expected)
    with f:
        try:
            _shard_meta(f, path)
            held = {str(_attr(g.attrs["id"])): n for n, g in f["utterances"].items()}
        except DAMAGE_ERRORS as err:
            if expected is None:
                raise UnreadableShard(f"{path}: cannot list its entries ({err})") from err
            return {}, dict(expected)
        failed: dict[str, str] = {}
        for uid, name in held.items():
            source = (expected or {}).get(uid, "")
            try:
                group = f["utterances"][name]
                source = str(_attr(group.attrs.get("source", "")))
                frames = group["frames"]
                for layer in range(frames.shape[0]):
                    frames[layer]
                group["pooled"][()]
            except DAMAGE_ERRORS:
                failed[uid] = source
                continue
            if expected is None or expected.get(uid) == source:
                good[uid] = source
    damaged = failed if expected is None else {u: s for u, s in expected.items() if u not in good}
    return good, damaged


def _record(path: Path, entries: Mapping[str, str], corrupt: Mapping[str, str] | None = None) -> dict:
    st = path.stat()
    rec = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "entries": dict(entries)}
    if corrupt:
        rec["corrupt"] = dict(corrupt)
    return rec


class IdentityStore:
    """One identity directory: ``store.json``, ``shards/``, ``index.json``.

    Args:
        path: the directory.

    Raises:
        FileNotFoundError: no ``store.json`` there.
        ValueError: ``store.json`` is unreadable or of another format.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not is_identity_store(self.path):
            raise FileNotFoundError(f"{self.path}: no identity store here (expected a folder holding {STORE_JSON}, "
                                    "written by `python -m features.extract` or `features.egemaps`).")
        data = _read_json(self.path / STORE_JSON, "store description")
        if not isinstance(data.get("identity"), dict):
            raise ValueError(f"{self.path / STORE_JSON}: expected an 'identity' object, found "
                             f"{type(data.get('identity')).__name__}. Remove this store and rerun the extraction.")
        self.identity: dict = data["identity"]

    @classmethod
    def create(cls, path: str | os.PathLike, identity: Mapping) -> IdentityStore:
        """Open the identity store at ``path``, creating it (``store.json`` written once) if it is not there.

        Raises:
            ValueError: a store is there with another identity.
        """
        path = Path(path)
        (path / SHARDS).mkdir(parents=True, exist_ok=True)
        if not is_identity_store(path):
            write_json(path / STORE_JSON, {"format": FORMAT, "identity": identity_of(identity)})
        store = cls(path)
        if _canonical(store.identity) != _canonical(identity_of(identity)):
            raise ValueError(f"{path}: holds features of other settings ({store.identity}); expected "
                             f"{identity_of(identity)}. Move it away and rerun.")
        return store

    @property
    def shards_dir(self) -> Path:
        return self.path / SHARDS

    def published(self) -> list[Path]:
        """Published shard files, oldest first."""
        return sorted(self.shards_dir.glob("*.h5")) if self.shards_dir.is_dir() else []

    def read_index(self) -> dict | None:
        """``index.json`` as written, or None where it is missing or unreadable (it is derived data)."""
        try:
            index = json.loads((self.path / INDEX).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        ok = isinstance(index, dict) and all(_valid_record(r) for r in index.values())
        return index if ok else None

    def load(self, *, verify: bool = False) -> tuple[dict, dict[str, dict[str, str]]]:
        """The index of the published shards: ``index.json`` completed from the shards themselves.

        Args:
            verify: build mode: a shard that changed since it was indexed (size or mtime), or that the index does
                not list, has every entry read (checksums); damaged entries move to its ``corrupt`` record.
                Reader mode (False): the index is trusted and unlisted shards are read from their attributes.

        Returns:
            ``(index, damaged)``: ``{shard name: {"size", "mtime_ns", "entries", ["corrupt"]}}`` in shard order,
            and ``{shard name: {uid: source}}`` of the entries found damaged now (``{}`` for a shard no index
            describes that cannot be read at all: it stays out of the index, and is found again next time).
        """
        stored = self.read_index() or {}
        index, damaged = {}, {}
        for path in self.published():
            rec, st = stored.get(path.name), path.stat()
            if rec is not None and (not verify or (rec["size"], rec["mtime_ns"]) == (st.st_size, st.st_mtime_ns)):
                index[path.name] = rec
                continue
            if verify:
                expected = None if rec is None else {**rec["entries"], **rec.get("corrupt", {})}
                try:
                    good, bad = verify_shard(path, expected)
                except UnreadableShard:  # reported by the caller each time, until the file is removed
                    damaged[path.name] = {}
                    continue
                if bad:
                    damaged[path.name] = bad
                corrupt = {**(rec or {}).get("corrupt", {}), **bad}
                index[path.name] = _record(path, good, {u: s for u, s in corrupt.items() if u not in good})
            else:
                try:
                    index[path.name] = _record(path, scan_shard(path))
                except DAMAGE_ERRORS:
                    index[path.name] = _record(path, {})
        return index, damaged

    def write_index(self, index: Mapping) -> bool:
        return write_json(self.path / INDEX, dict(index))


def _valid_record(record) -> bool:
    """An index record as :func:`_record` writes it (a hand-edited or foreign one is rebuilt, never trusted)."""
    def str_map(value) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())

    return isinstance(record, dict) and {"size", "mtime_ns", "entries"} <= set(record) \
        and all(isinstance(record[k], int) and not isinstance(record[k], bool) for k in ("size", "mtime_ns")) \
        and str_map(record["entries"]) and str_map(record.get("corrupt", {}))


class IndexMismatch(ValueError):
    """The index lists an entry in a shard that does not hold it (an edited or foreign ``index.json``)."""


def entries_by_uid(index: Mapping[str, Mapping]) -> dict[str, dict[str, str]]:
    """``{uid: {source: shard name}}`` over an index; where shards hold the same entry, the newest wins."""
    held: dict[str, dict[str, str]] = {}
    for name in sorted(index):
        for uid, source in index[name]["entries"].items():
            held.setdefault(uid, {})[source] = name
    return held


def dir_size(path: str | os.PathLike) -> int:
    """Bytes a folder takes on disk (allocated blocks where the platform says, else file sizes)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(root, name))
                total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


# ---------------------------------------------------------------------------------------------- the reader


def _not_a_store(path: Path) -> Exception:
    if not path.exists():
        return FileNotFoundError(f"{path}: no feature store here; expected the output (--out) of "
                                 "`python -m features.extract` or `python -m features.egemaps`.")
    if path.is_file():
        with contextlib.suppress(OSError):
            with h5py.File(path, "r") as f:
                found = f.attrs.get("format")
            return ValueError(f"{path}: expected a feature store folder of format {FORMAT!r}, found an HDF5 file "
                              f"(format {found!r}). Rebuild it with `python -m features.extract --out DIR` (or "
                              "`features.egemaps`).")
        return ValueError(f"{path}: expected a feature store folder of format {FORMAT!r}, found a file. Pass the "
                          "--out of `python -m features.extract` or `features.egemaps`.")
    stores = sorted(p.name for p in path.iterdir() if is_identity_store(p))
    if stores:
        return ValueError(f"{path}: no finished run here ({CURRENT} is missing), found identity stores {stores}. "
                          "Rerun the extraction with this --out, or pass one of them.")
    return ValueError(f"{path}: expected a feature store folder (with {CURRENT} or {STORE_JSON}), found neither. "
                      "Pass the --out of `python -m features.extract` or `features.egemaps`.")


class FeatureStore:
    """Read-only access to a feature store; datasets are read on demand, shard files opened lazily.

    Args:
        path: a collection (the ``--out`` of an extraction: the entries of its last run) or one identity store
            inside it (all its entries, the newest per utterance).

    Raises:
        FileNotFoundError: nothing there, or the view's identity store is gone.
        ValueError: not a feature store of this format, or its view names entries no shard holds.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._open: OrderedDict[str, h5py.File] = OrderedDict()
        self._lock = None
        current = read_current(self.path) if self.path.is_dir() else None
        if current is not None:
            store_dir = self.path / current["store"]
            if not is_identity_store(store_dir):
                raise FileNotFoundError(f"{self.path}/{CURRENT} points to {current['store']!r}, which is not there "
                                        "(removed?). Rerun the extraction with this --out to recompute it.")
        elif self.path.is_dir() and is_identity_store(self.path):
            store_dir = self.path
        else:
            raise _not_a_store(self.path)
        self._lock = hold_store(store_dir)  # released by close(); `features.stores remove` waits for it
        if self._lock is None:
            raise FileNotFoundError(f"{store_dir}: removed while it was being opened; rerun the extraction with "
                                    f"--out {store_dir.parent} to recompute it.")
        try:
            self._load(store_dir, current)
        except BaseException:
            self.close()
            raise

    def _load(self, store_dir: Path, current: dict | None) -> None:
        self.store = IdentityStore(store_dir)
        index, _ = self.store.load()
        held = entries_by_uid(index)
        if current is None:  # the newest entry of every utterance
            self._where = {u: by_source[max(by_source, key=lambda s: by_source[s])] for u, by_source in held.items()}
        else:
            self._where, missing = {}, []
            for uid, source in current["entries"].items():
                if source in held.get(uid, {}):
                    self._where[uid] = held[uid][source]
                else:
                    missing.append(uid)
            if missing:
                raise ValueError(f"{self.path}: {len(missing)} entries of the last run's view are in no shard of "
                                 f"{store_dir.name} (e.g. {missing[0]!r}); a shard was removed or damaged. Rerun "
                                 "the extraction with this --out to recompute them.")
        self._ids = sorted(self._where, key=escape_id)
        self.attrs: dict = dict(self.store.identity)
        if self._where:
            newest = max(self._where.values())
            meta = self._guard(None, newest, "attributes", lambda f: _shard_meta(f, self._shard_path(newest)))
            self.attrs.update({k: meta[k] for k in RUN_KEYS if k in meta})

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _shard_path(self, name: str) -> Path:
        return self.store.shards_dir / name

    def _file(self, name: str) -> h5py.File:
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        f = h5py.File(self._shard_path(name), "r")
        self._open[name] = f
        while len(self._open) > MAX_OPEN_SHARDS:
            self._open.popitem(last=False)[1].close()
        return f

    def _guard(self, uid: str | None, shard: str, what: str, read):
        """Run ``read(h5 file)``; any HDF5 failure (a checksum mismatch, a damaged header) becomes a clear error."""
        try:
            return read(self._file(shard))
        except IndexMismatch:
            raise
        except DAMAGE_ERRORS as err:
            whose = f"{uid}: cannot read its {what}" if uid else f"cannot read the {what}"
            raise OSError(f"{whose} from {self._shard_path(shard)} ({err}); the shard was damaged after it was "
                          f"written. {_RERUN}") from err

    @property
    def num_layers(self) -> int:
        """Number of stored layers ``L`` (13 for all of wav2vec2-base, 1 for eGeMAPS)."""
        return len(self.attrs["layers"])

    def layer_positions(self, layers: Sequence[int] | None) -> list[int]:
        """Positions in the stored layers to use: all when ``layers`` is empty or None, else checked.

        Raises:
            ValueError: a position outside ``0 .. num_layers - 1``, or one given twice (it would be read and
                weighted twice).
        """
        used = list(range(self.num_layers)) if not layers else [int(i) for i in layers]
        bad = [i for i in used if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"--layers {bad}: expected positions 0..{self.num_layers - 1} of the store's "
                             f"layers {self.attrs['layers']}.")
        twice = sorted({i for i in used if used.count(i) > 1})
        if twice:
            raise ValueError(f"layers {used}: expected each layer once, found {twice} more than once. "
                             "Drop the repeats.")
        return used

    def ids(self) -> list[str]:
        """Utterance ids (the manifest's ``id``), sorted by their escaped names."""
        return list(self._ids)

    def __contains__(self, uid: str) -> bool:
        return uid in self._where

    def __len__(self) -> int:
        return len(self._where)

    def _read(self, uid: str, what: str, read):
        try:
            shard = self._where[uid]
        except KeyError:
            raise KeyError(f"{uid!r} is not in {self.path} ({len(self)} utterances); expected an id of the "
                           "manifest it was extracted from. Re-run extraction on that manifest.") from None
        def entry(f: h5py.File):
            name = escape_id(uid)
            if name not in f["utterances"]:  # the file reads, but the index is wrong about it: not damage
                raise IndexMismatch(
                    f"{uid}: {self.store.path / INDEX} lists it in shard {self._shard_path(shard)}, which holds no such "
                    "entry: the index was edited or copied from another store; the shards are intact. Delete that "
                    "index.json: it is derived data, read again from the shards by readers and rewritten by the "
                    "next extraction with the same --out.")
            return read(f["utterances"][name])

        return self._guard(uid, shard, what, entry)

    def num_frames(self, uid: str) -> int:
        """Number of frames ``T`` of one utterance."""
        return int(self._read(uid, "frames", lambda g: g["frames"].shape[1]))

    def frames(self, uid: str, layer: int) -> np.ndarray:
        """Frame-level features of one stored layer.

        Args:
            uid: utterance id.
            layer: position in ``attrs["layers"]`` (``0 <= layer < num_layers``), not the hidden-state index.

        Returns:
            ``[T, H]`` float32.

        Raises:
            OSError: the shard holding it is damaged (checksum mismatch).
        """
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer}: expected 0 <= layer < {self.num_layers} (stored hidden states "
                             f"{self.attrs['layers']}); pass a position in attrs['layers'].")
        return self._read(uid, "frames", lambda g: g["frames"][layer]).astype(np.float32, copy=False)

    def all_frames(self, uid: str) -> np.ndarray:
        """Every stored layer of one utterance, ``[L, T, H]`` float32."""
        return self._read(uid, "frames", lambda g: g["frames"][()]).astype(np.float32, copy=False)

    def pooled(self, uid: str) -> np.ndarray:
        """Utterance-level features: ``[L, 2H]`` mean ‖ std per layer (eGeMAPS: ``[1, 88]``), float32."""
        return self._read(uid, "pooled", lambda g: g["pooled"][()]).astype(np.float32, copy=False)

    def entry_attrs(self, uid: str) -> dict:
        """Per-utterance attributes (``id``, ``num_frames``, ``source``, ``duration_s``, ...)."""
        return self._read(uid, "attributes", lambda g: {k: _attr(v) for k, v in g.attrs.items()})

    def shard_of(self, uid: str) -> Path:
        """The shard file holding ``uid``'s entry (for messages and tools)."""
        return self._shard_path(self._where[uid])


# ---------------------------------------------------------------------------------------------- the writer


def mean_std(frames: np.ndarray) -> np.ndarray:
    """Per-layer mean ‖ std (ddof=0) over time: ``[L, T, H]`` -> ``[L, 2H]`` float32."""
    x = np.asarray(frames, dtype=np.float64)
    return np.concatenate([x.mean(axis=1), x.std(axis=1)], axis=-1).astype(np.float32)


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x.astype(dtype)``; float32 -> float16 through torch when it is loaded (torch's conversion is the faster one)."""
    torch = sys.modules.get("torch")
    if torch is not None and dtype == np.float16 and x.dtype == np.float32:
        return torch.from_numpy(np.ascontiguousarray(x)).half().numpy()
    return x.astype(dtype, copy=False)


def _fits(x: np.ndarray, limit: float) -> bool:
    """Every value of ``x`` finite and within ``±limit``. Through torch when it is loaded: numpy reduces float16
    element by element, far slower than torch's ``aminmax`` (docs/benchmarks.md)."""
    torch = sys.modules.get("torch")
    if torch is not None and x.dtype in (np.float16, np.float32, np.float64):
        lo, hi = (float(v) for v in torch.aminmax(torch.from_numpy(np.ascontiguousarray(x))))
    else:
        lo, hi = float(x.min()), float(x.max())
    return bool(np.isfinite(lo) and np.isfinite(hi) and max(hi, -lo) <= limit)


class _Moments:
    """Streaming per-layer mean and variance (Chan et al.'s pairwise merge), float64."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, piece: np.ndarray) -> None:  # piece [L, t, H]
        n_b = piece.shape[1]
        torch = sys.modules.get("torch")
        if torch is not None and piece.dtype == np.float32:  # two float32 passes in torch, ~1e-7 from float64
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
    """Write one shard file (the caller publishes it; see :class:`features.cache.PartWriter`).

    The shard is built in memory (HDF5's core driver) and :meth:`close` writes its image with ordinary file I/O:
    a full disk is then a plain ``OSError`` from that write, never a failure inside the HDF5 library (which leaves
    its file state broken and can crash the process at exit). A shard holds at most a few dozen utterances, or one
    long file.

    Args:
        path: file to create (overwritten).
        attrs: the store's settings (``meta``, run keys included); must contain ``layers`` and ``storage_dtype``.
    """

    def __init__(self, path: str | os.PathLike, attrs: Mapping):
        self.path = Path(path)
        self.attrs = dict(attrs)
        self.storage_dtype = np.dtype(self.attrs["storage_dtype"])
        # libver v110: the file's own metadata carries checksums too, so damage there fails on read (with the 1.0
        # format, damaged headers could lead past the datasets' Fletcher-32 to other data); HDF5 >= 1.10 reads it
        self._h5 = h5py.File(f"{self.path.name}-{id(self)}", "w", driver="core", backing_store=False,
                             libver=("v110", "latest"))
        self._h5.attrs["format"] = FORMAT
        self._h5.attrs["meta"] = json.dumps(self.attrs)
        self._utts = self._h5.create_group("utterances")

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Write the shard's image to :attr:`path` (nothing is written if that fails half-way: the file is
        removed), and release the memory."""
        if not self._h5.id.valid:
            return
        try:
            self._h5.flush()
            image = self._h5.id.get_file_image()
        finally:
            self._h5.close()
        try:
            with open(self.path, "wb") as f:
                f.write(image)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise

    def discard(self) -> None:
        """Drop what was added, writing nothing."""
        if self._h5.id.valid:
            self._h5.close()

    def add(self, uid: str, frames: np.ndarray, pooled: np.ndarray | None = None, **meta) -> None:
        """Add one utterance: ``frames [L, T, H]`` (one chunk per layer); ``pooled [L, D]`` (mean ‖ std of
        ``frames`` when None)."""
        frames = np.asarray(frames)
        self._add(uid, [frames], frames.shape[1], frames.shape[2], pooled, chunk=frames.shape[1], meta=meta)

    def add_pieces(self, uid: str, pieces: Iterable[np.ndarray], *, num_frames: int, hidden_size: int,
                   pooled: np.ndarray | None = None, **meta) -> None:
        """Add one utterance whose frames arrive as consecutive ``[L, t, H]`` pieces (bounded memory: chunks of
        :data:`CHUNK_FRAMES` frames per layer, each written whole).

        Raises:
            ValueError: the pieces do not add up to ``num_frames`` frames of ``len(attrs["layers"])``
                layers, or a value does not fit the storage dtype.
        """
        self._add(uid, pieces, num_frames, hidden_size, pooled, chunk=min(num_frames, CHUNK_FRAMES), meta=meta)

    def _add(self, uid, pieces, num_frames, hidden_size, pooled, *, chunk, meta) -> None:
        if num_frames < 1:
            raise ValueError(f"{uid}: expected at least one frame, found {num_frames}.")
        group = self._utts.create_group(escape_id(uid))
        try:
            self._fill(uid, group, pieces, num_frames, hidden_size, pooled, chunk)
        except BaseException:
            del self._utts[escape_id(uid)]  # never leave a half-written entry behind
            raise
        group.attrs.update({"id": uid, "num_frames": num_frames, **{k: v for k, v in meta.items() if v is not None}})

    def _fill(self, uid: str, group: h5py.Group, pieces: Iterable[np.ndarray], num_frames: int, hidden_size: int,
              pooled: np.ndarray | None, chunk: int) -> None:
        n_layers = len(self.attrs["layers"])
        # every element is written below, so no fill pass (HDF5 would otherwise write the whole dataset twice)
        data = group.create_dataset("frames", shape=(n_layers, num_frames, hidden_size), dtype=self.storage_dtype,
                                    chunks=(1, chunk, hidden_size), fletcher32=True, fill_time="never")
        moments, at, written, held = _Moments(), 0, 0, []
        for piece in pieces:
            if piece.shape[0] != n_layers or piece.shape[2] != hidden_size or at + piece.shape[1] > num_frames:
                raise ValueError(f"{uid}: piece of shape {piece.shape} at frame {at} does not fit "
                                 f"[{n_layers}, {num_frames}, {hidden_size}].")
            if piece.size and not _fits(piece, float(np.finfo(self.storage_dtype).max)):
                raise ValueError(f"{uid}: values out of {self.storage_dtype} range (max |x| = "
                                 f"{np.abs(piece).max():.4g}); expected finite features. "
                                 "Store as float32 (--storage-dtype float32).")
            held.append(_cast(piece, self.storage_dtype))
            if pooled is None:
                moments.update(piece)
            at += piece.shape[1]
            end = at if at == num_frames else at // chunk * chunk  # whole chunks only: no read-modify-write
            if end > written:
                block = held[0] if len(held) == 1 else np.concatenate(held, axis=1)
                data.write_direct(np.ascontiguousarray(block[:, :end - written]), dest_sel=np.s_[:, written:end])
                held = [block[:, end - written:]] if at > end else []
                written = end
        if at != num_frames:
            raise ValueError(f"{uid}: expected {num_frames} frames, the pieces held {at}.")
        pooled = np.asarray(moments.pooled() if pooled is None else pooled, dtype=np.float32)
        group.create_dataset("pooled", data=pooled, chunks=pooled.shape, fletcher32=True)


def content_hash(*arrays: np.ndarray | None) -> str:
    """Hash of arrays' bytes: the ``source`` of synthetic entries (other data, other entry)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def write_store(path: str | os.PathLike, entries: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
                attrs: Mapping | None = None) -> Path:
    """Write a collection whose view is exactly ``entries`` (handy for building small synthetic stores in tests).

    The entries go to one new shard of the identity store of ``attrs``; ``current.json`` then points at them.
    A failure leaves the collection as it was (and none at all where there was none).

    Args:
        path: the collection folder (created if needed).
        entries: ``{uid: (frames [L, T, H], pooled [L, D] or None)}``; None pools as mean ‖ std ``[L, 2H]``.
        attrs: store settings; missing keys are taken from :data:`DEFAULT_ATTRS` and ``layers`` defaults
            to ``list(range(L))``.

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> write_store(tmp / "f.h5", {"c/a": (np.ones((2, 5, 4)), None)}, {})   # doctest: +SKIP
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: expected a feature store folder, found a file. Remove it or choose another path.")
    first = next(iter(entries.values()), (np.zeros((1, 1, 1)), None))[0]
    meta = {**DEFAULT_ATTRS, "layers": list(range(np.shape(first)[0])), **(attrs or {})}
    identity = identity_of(meta)
    existed = path.exists()
    try:
        store = IdentityStore.create(path / identity_slug(identity), identity)
        view = {}
        if entries:
            shard = store.shards_dir / new_shard_name()
            tmp = temporary_sibling(shard)
            try:
                with StoreWriter(tmp, meta) as writer:
                    for uid, (frames, pooled) in entries.items():
                        view[uid] = content_hash(frames, pooled)
                        writer.add(uid, frames, pooled, source=view[uid])
                replace_synced(tmp, shard)
            finally:
                tmp.unlink(missing_ok=True)
        store.write_index(store.load()[0])
        write_current(path, store.path.name, view)
    except BaseException:
        if not existed:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return path
