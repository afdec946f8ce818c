"""Incremental, resumable, kill-safe building of a feature store (shared by extract and egemaps).

HDF5 has no journal, so a store is never modified in place:

1. :meth:`StoreBuild.plan` hashes every manifest row's audio and keeps what the existing store (same
   settings, same audio content) and any completed part files already hold; the rest is the work.
2. New entries go to ``<out>.parts/part-NNNNN.h5.tmp``, which is closed and renamed to ``part-NNNNN.h5``
   every ``part_entries`` utterances: a completed part is always whole. Writers do not fsync parts (that cost
   about 2 % of extraction time): a part need only outlive a killed process, and one older than the machine's
   last boot, which a crash may have torn, is dropped and recomputed.
3. As parts complete, their entries are copied into the new store (:meth:`StoreBuild.absorb`);
   :meth:`StoreBuild.finish` adds the kept entries and any parts not yet copied, under a temporary name,
   ``os.replace``-s it onto ``<out>``, then removes the parts.

A kill at any moment leaves the old store intact plus whole parts (reused next run) and at most one
``*.tmp`` (deleted next run). Changed settings (encoder, revision, crop, dtype, ...) rebuild from scratch.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from features.store import FeatureStore, StoreWriter, replace_synced, temporary_sibling
from pipeline.roots import read_manifest

SKIP_COLUMNS = ["id", "path", "reason", "detail"]


def read_manifests(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate manifests (``id, path, ...``); a header-only manifest is fine.

    Raises:
        ValueError: a manifest lacks ``id`` or ``path``, or an id occurs twice.
    """
    frames = []
    for path in paths:
        df = read_manifest(path, keep_default_na=False)  # paths resolved against the recorded roots
        missing = {"id", "path"} - set(df.columns)
        if missing:
            raise ValueError(f"{path}: expected manifest columns id and path, found {list(df.columns)}; "
                             "pass a manifest written by pipeline.manifest or pipeline.augment.")
        frames.append(df)
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["id", "path"])
    dup = rows["id"][rows["id"].duplicated()]
    if len(dup):
        raise ValueError(f"expected unique ids across manifests, found {len(dup)} repeated (e.g. {dup.iloc[0]!r}); "
                         "an augmented manifest must give its copies ids of their own.")
    return rows


def source_hash(path: str | os.PathLike) -> str:
    """Content hash of an audio file (so a changed file is recomputed, a touched one is not)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_skips(path: str | os.PathLike, skips: Iterable[dict]) -> Path:
    """Write the skips report (``id, path, reason, detail``), header-only when nothing was skipped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SKIP_COLUMNS)
        writer.writeheader()
        writer.writerows({k: s.get(k, "") for k in SKIP_COLUMNS} for s in skips)
    return path


def advance(bar, seconds: float) -> None:
    """Advance a tqdm bar by seconds of audio; the total (from rounded manifest durations) grows if needed."""
    if bar.total is not None and bar.n + seconds > bar.total:
        bar.total = bar.n + seconds
    bar.update(seconds)


def _same(a: dict, b: dict) -> bool:
    strip = lambda d: json.loads(json.dumps({k: v for k, v in d.items() if k != "versions"}))  # noqa: E731
    return strip(a) == strip(b)


def _pid_alive(pid: str) -> bool:
    """Whether the process that owns a temporary file (pid in its name) still runs."""
    try:
        os.kill(int(pid), 0)
        return True
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


class PartWriter:
    """One part file: entries go to ``<path>.tmp``, which :meth:`close` publishes as ``path``.

    Args:
        path: the final part file name (from :meth:`StoreBuild.reserve_part`).
        meta: the store settings.
    """

    def __init__(self, path: str | os.PathLike, meta: dict):
        self.path, self.meta, self.count = Path(path), meta, 0
        self._writer: StoreWriter | None = None

    def add(self, uid: str, *, source: str, **kw) -> None:
        """Add one utterance: ``frames=[L, T, H]`` (+ ``pooled``), or ``pieces=..., num_frames=, hidden_size=``
        as for :class:`features.store.StoreWriter`; other keywords become entry attributes."""
        if self._writer is None:
            self._writer = StoreWriter(self.path.with_name(self.path.name + ".tmp"), self.meta)
        if "pieces" in kw:
            self._writer.add_pieces(uid, source=source, **kw)
        else:
            self._writer.add(uid, source=source, **kw)
        self.count += 1

    def close(self) -> Path | None:
        """Close the part and publish it with :func:`publish_part`; returns the part, or None when it holds no
        entry."""
        if self._writer is None:
            return None
        self._writer.close()
        written, self._writer = self._writer.path, None
        return publish_part(written)


@functools.cache
def boot_time() -> float | None:
    """When the machine last booted (seconds since the epoch), or None where ``/proc/stat`` does not say."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    return None


def publish_part(tmp: str | os.PathLike) -> Path:
    """Publish a closed ``part-*.h5.tmp`` as ``part-*.h5`` by renaming it: a part is always whole. It is
    fsync'd only where the boot time is unknown (see :meth:`StoreBuild._scan` for why that suffices)."""
    tmp = Path(tmp)
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if boot_time() is None:
        replace_synced(tmp, final)
    else:
        os.replace(tmp, final)
    return final


class StoreBuild:
    """One incremental build of ``out`` with settings ``meta``.

    Args:
        out: the store file.
        meta: store settings (see :mod:`features.store`); every key except ``versions`` must match for
            existing entries to be reused.
        part_entries: utterances per part file (the most work a kill can lose).
    """

    def __init__(self, out: str | os.PathLike, meta: dict, *, part_entries: int = 32):
        self.out, self.meta, self.part_entries = Path(out), dict(meta), part_entries
        self.parts_dir = self.out.with_name(self.out.name + ".parts")
        self.rebuild_reason: str | None = None
        self._available: dict[str, dict[str, Path]] = {}   # uid -> {source hash: file holding it}
        self._part: PartWriter | None = None
        self._n_parts = 0
        self._assembly: StoreWriter | None = None      # the new store, filled as parts complete
        self._absorbed: dict[str, str] = {}             # uid -> source hash already in it

    def _scan(self) -> None:
        for tmp in self.out.parent.glob(self.out.name + ".tmp-*"):
            if not _pid_alive(tmp.name.rsplit("-", 1)[-1]):
                tmp.unlink(missing_ok=True)
        files = sorted(self.parts_dir.glob("part-*.h5")) if self.parts_dir.is_dir() else []
        booted = boot_time()
        for f in [f for f in files if booted is not None and f.stat().st_mtime < booted]:
            files.remove(f)  # written unsynced before a reboot: a crash may have torn it
            f.unlink()
        for tmp in self.parts_dir.glob("part-*.h5.tmp") if self.parts_dir.is_dir() else []:
            if not _pid_alive(tmp.name.split("-")[1]):
                tmp.unlink(missing_ok=True)
        if self.out.exists():
            try:
                with FeatureStore(self.out) as fs:
                    if _same(fs.attrs, self.meta):
                        files.insert(0, self.out)
                    else:
                        changed = sorted(k for k in set(fs.attrs) | set(self.meta) if k != "versions"
                                         and fs.attrs.get(k) != self.meta.get(k))
                        self.rebuild_reason = "settings changed: " + ", ".join(
                            f"{k} {fs.attrs.get(k)!r} -> {self.meta.get(k)!r}" for k in changed)
            except (OSError, ValueError) as err:
                self.rebuild_reason = f"existing store unreadable ({err})"
        for f in files:
            try:
                with FeatureStore(f) as fs:
                    if f != self.out and not _same(fs.attrs, self.meta):
                        f.unlink()
                        continue
                    for uid in fs.ids():
                        self._available.setdefault(uid, {})[fs.entry_attrs(uid).get("source", "")] = f
            except (OSError, ValueError):
                f.unlink()  # a part is renamed only when whole; an unreadable one is foreign debris

    def plan(self, rows: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
        """Split the manifest rows into work and skips.

        Returns:
            ``(todo, skips)``: the rows to compute (with a ``source`` column), and skips
            (``id, path, reason, detail``) for rows whose file is missing. ``self.reused`` counts the rest.
        """
        self._scan()
        sources, skips = [], []
        for uid, path in zip(rows["id"], rows["path"], strict=True):
            try:
                sources.append(source_hash(path))
            except OSError as err:
                sources.append(None)
                skips.append({"id": uid, "path": path, "reason": "missing", "detail": str(err)})
        rows = rows.assign(source=sources)
        rows = rows[rows["source"].notna()]
        self.wanted_rows = rows  # every row with readable bytes, done or not
        self._wanted = dict(zip(rows["id"], rows["source"], strict=True))
        done = [s in self._available.get(u, {}) for u, s in self._wanted.items()]
        self.reused = sum(done)
        return rows.loc[~np.array(done, dtype=bool)], skips

    def reserve_part(self) -> Path:
        """A fresh part file name (for a worker process's :class:`PartWriter`)."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        while True:  # pid: no clash with another process; the check: none with an earlier run of this one
            self._n_parts += 1
            part = self.parts_dir / f"part-{os.getpid()}-{self._n_parts:05d}.h5"
            if not part.exists() and not part.with_name(part.name + ".tmp").exists():
                return part

    def add(self, uid: str, *, source: str, roll: bool = True, **kw) -> None:
        """Store one computed utterance (arguments as for :meth:`PartWriter.add`) in rolling part files: with
        ``roll``, the part is published once it holds ``part_entries``; otherwise when :meth:`roll` says."""
        if self._part is None:
            self._part = PartWriter(self.reserve_part(), self.meta)
        self._part.add(uid, source=source, **kw)
        if roll:
            self.roll()

    def roll(self) -> None:
        """Publish the current part if it holds ``part_entries`` utterances or more."""
        if self._part is not None and self._part.count >= self.part_entries:
            self._publish()

    def _publish(self) -> None:
        """Close the current part and absorb it (an empty one is not published)."""
        part, self._part = self._part.close(), None
        if part is not None:
            self.absorb(part)

    def absorb(self, part: Path) -> None:
        """Copy a published part's entries into the new store while the work goes on, so that :meth:`finish`
        has little left to copy. The part stays until the new store is in place (a kill loses nothing), but is
        synced first and each entry's frames leave the page cache once copied: the cache then holds one copy of
        the store, not two, and the new store's pages are recycled from the part's (on a VM that returns free
        memory to its host, fresh pages cost ~2.6 ms per MB to fault in, recycled ones a tenth of that)."""
        if self._assembly is None:
            self._assembly = StoreWriter(temporary_sibling(self.out), self.meta)
        drop = hasattr(os, "posix_fadvise")  # Linux; elsewhere the part's pages stay cached
        with open(part, "rb") as raw, FeatureStore(part) as fs:
            if drop:
                os.fdatasync(raw.fileno())  # only clean pages can leave the cache
            for uid in fs.ids():
                self._assembly.copy_entry(fs, uid)
                self._absorbed[uid] = fs.entry_attrs(uid).get("source", "")
                extent = fs.frames_extent(uid)
                if drop and extent is not None:
                    os.posix_fadvise(raw.fileno(), *extent, os.POSIX_FADV_DONTNEED)
        if drop:  # written out now, while the workers compute, rather than all at once by finish's fsync
            self._assembly.sync()

    def _discard_assembly(self) -> None:
        if self._assembly is not None:
            self._assembly.close()
            self._assembly.path.unlink(missing_ok=True)
        self._assembly, self._absorbed = None, {}

    def finish(self) -> dict:
        """Merge parts and kept entries into a fresh store, atomically; returns counts."""
        if self._part is not None:
            self._publish()
        self._available = {}
        self._scan()
        keep = {u: held[self._wanted[u]] for u, held in self._available.items()
                if self._wanted.get(u) in held}
        stale = sum(1 for u, held in self._available.items() if self.out in held.values() and u not in keep)
        from_parts = any(f != self.out for f in keep.values())
        if self.out.exists() and self.rebuild_reason is None and not stale and not from_parts:
            self._discard_assembly()
            return {"stored": len(keep), "removed": 0}
        if any(keep.get(u) is None or self._wanted[u] != src for u, src in self._absorbed.items()):
            self._discard_assembly()  # not expected: absorbed entries are this run's; start over to be safe
        writer = self._assembly or StoreWriter(temporary_sibling(self.out), self.meta)
        handles: dict[Path, FeatureStore] = {}
        try:
            for uid in sorted(set(keep) - set(self._absorbed)):
                if keep[uid] not in handles:
                    handles[keep[uid]] = FeatureStore(keep[uid])
                writer.copy_entry(handles[keep[uid]], uid)
            writer.close()
            replace_synced(writer.path, self.out)
        finally:
            for h in handles.values():
                h.close()
            writer.close()
            writer.path.unlink(missing_ok=True)
            self._assembly, self._absorbed = None, {}
        for part in self.parts_dir.glob("part-*.h5") if self.parts_dir.is_dir() else []:
            part.unlink()
        with contextlib.suppress(OSError):
            self.parts_dir.rmdir()
        return {"stored": len(keep), "removed": stale}


def finish(stage: str, build: StoreBuild, *, out, skips, skipped: list[dict], computed: int,
           audio_seconds: float) -> dict:
    """Merge the build, write the skips file and print and return the run's summary."""
    counts = build.finish()
    skips = write_skips(skips or f"{out}.skips.csv", skipped)
    print(f"{stage}: {computed} computed ({audio_seconds:.1f} s of audio), {build.reused} reused, {len(skipped)} "
          f"skipped (see {skips}), {counts['removed']} removed; {counts['stored']} utterances in {out}")
    return {"computed": computed, "reused": build.reused, "skipped": len(skipped), **counts,
            "audio_seconds": round(audio_seconds, 2)}


def add_store_args(parser) -> None:
    """The arguments every store-building command takes: manifests, output store, skips file."""
    parser.add_argument("--manifest", action="append", required=True, help="manifest CSV (repeatable)")
    parser.add_argument("--out", required=True, help="the HDF5 store to build or update")
    parser.add_argument("--skips", help="CSV of rows not stored (default: <out>.skips.csv)")
