"""Incremental, resumable, kill-safe building of a feature store (shared by extract and egemaps).

A store is append-only (layout in :mod:`features.store`): nothing published is ever modified.

1. :meth:`StoreBuild.plan` opens (or creates) the identity store of the run's settings inside the collection
   ``out``, deletes temporary files of dead processes, checks every shard against ``index.json`` (a shard that
   changed since it was published has each entry read, so that damaged ones are recomputed, not reused) and
   hashes every manifest row's audio. An entry is reused where the identity store holds that utterance with that
   audio content; the rest is the work.
2. New entries go to new shards, written as ``shards/<name>.h5.tmp-<host>.<pid>`` and published by fsync and rename
   every ``part_entries`` utterances (by the worker processes themselves, or by :meth:`StoreBuild.add`);
   :meth:`StoreBuild.absorb` registers a published shard, no data is copied.
3. :meth:`StoreBuild.finish` rewrites ``index.json`` if shards were added and ``current.json`` (the view: which
   identity store, which ``uid -> source`` entries this run wanted) if it changed, each atomically.

A kill at any moment leaves the old view and every published shard intact (the next run reuses them) plus at most
a few ``*.tmp-<host>.<pid>`` files (deleted by the next run on that host). A rerun on unchanged inputs writes nothing; settings switched
back and forth find their identity store again.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from features.store import (
    SHARDS,
    IdentityStore,
    StoreWriter,
    entries_by_uid,
    hold_store,
    identity_of,
    identity_slug,
    is_identity_store,
    new_shard_name,
    read_current,
    replace_synced,
    scan_shard,
    temporary_sibling,
    this_host,
    write_current,
    write_if_changed,
)
from pipeline.cli import existing_file, output_dir, output_file
from pipeline.processes import pid_alive

SKIP_COLUMNS = ["id", "path", "reason", "detail"]


def source_hash(path: str | os.PathLike) -> str:
    """Content hash of an audio file (so a changed file is recomputed, a touched one is not)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_skips(path: str | os.PathLike, skips: Iterable[dict]) -> Path:
    """Write the skips report (``id, path, reason, detail``, sorted by id: rows are skipped in the order tasks
    finish), header-only when nothing was skipped, atomically (a kill mid-write leaves the old report whole); an
    unchanged report is left as it is (a rerun that does nothing writes nothing)."""
    path = Path(path)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=SKIP_COLUMNS)
    writer.writeheader()
    writer.writerows(sorted(({k: s.get(k, "") for k in SKIP_COLUMNS} for s in skips), key=lambda s: str(s["id"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(path.parent, path.name)  # a killed run's half-written report (it sits outside the store)
    write_if_changed(path, text.getvalue())
    return path


def advance(bar, seconds: float) -> None:
    """Advance a tqdm bar by seconds of audio; the total (from rounded manifest durations) grows if needed."""
    if bar.total is not None and bar.n + seconds > bar.total:
        bar.total = bar.n + seconds
    bar.update(seconds)


def remove_dead_temporaries(folder: Path, name: str = "*") -> list[Path]:
    """Delete the ``<name>.tmp-<host>.<pid>`` files in ``folder`` (``name``: a glob, every file's by default) that
    this host's dead processes left (a killed writer's debris); returns them. Other hosts' files are left alone:
    their pids mean nothing here, and on a shared filesystem such a file may be a live writer's."""
    gone, here = [], this_host()
    for tmp in folder.glob(f"{glob.escape(name) if name != '*' else name}.tmp-*") if folder.is_dir() else []:
        host, _, pid = tmp.name.rsplit(".tmp-", 1)[-1].rpartition(".")
        if tmp.is_file() and host in {here, ""} and not pid_alive(pid):  # "": named by an older version, pid only
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


class PartWriter:
    """One new shard: entries go to ``<path>.tmp-<host>.<pid>``, which :meth:`close` publishes as ``path``.

    Self-contained, so that a worker process (forked or spawned) writes and publishes its own shards.

    Args:
        path: the shard's final name (from :meth:`StoreBuild.reserve_part`).
        meta: the store settings (run keys included: they are recorded in the shard).
    """

    def __init__(self, path: str | os.PathLike, meta: dict):
        self.path, self.meta, self.count = Path(path), meta, 0
        self._writer: StoreWriter | None = None

    def add(self, uid: str, *, source: str, **kw) -> None:
        """Add one utterance: ``frames=[L, T, H]`` (+ ``pooled``), or ``pieces=..., num_frames=, hidden_size=``
        as for :class:`features.store.StoreWriter`; other keywords become entry attributes."""
        if self._writer is None:
            self._writer = StoreWriter(temporary_sibling(self.path), self.meta)
        if "pieces" in kw:
            self._writer.add_pieces(uid, source=source, **kw)
        else:
            self._writer.add(uid, source=source, **kw)
        self.count += 1

    def discard(self) -> None:
        """Give the unfinished shard up after a failure (a full disk, say): close it, ignoring further errors, and
        delete it, so that nothing half-written stays open for the HDF5 library to flush at exit."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        writer.discard()
        writer.path.unlink(missing_ok=True)

    def close(self) -> Path | None:
        """Close the shard, fsync it and rename it to ``path``; returns ``path``, or None when it holds no entry."""
        if self._writer is None:
            return None
        self._writer.close()
        written, self._writer = self._writer.path, None
        replace_synced(written, self.path)
        return self.path


class StoreBuild:
    """One incremental build of the collection ``out`` with settings ``meta``.

    Args:
        out: the collection folder (``--out``).
        meta: store settings (see :mod:`features.store`); all but ``versions`` and ``provenance`` make the
            identity store its entries go to.
        part_entries: utterances per shard written by :meth:`add` (the most work a kill can lose).

    Attributes (after :meth:`plan`):
        wanted_rows: every manifest row with readable audio (``source`` column added), done or not.
        reused: wanted entries the identity store already held.
        corrupt: wanted entries found damaged in a shard (recomputed).
        rebuild_reason: always None: changed settings go to another identity store, nothing is rebuilt.
    """

    def __init__(self, out: str | os.PathLike, meta: dict, *, part_entries: int = 32):
        self.out, self.meta, self.part_entries = Path(out), dict(meta), part_entries
        self.identity = identity_of(self.meta)
        self.store_dir = self.out / identity_slug(self.identity)
        self.rebuild_reason: str | None = None
        self.reused = self.corrupt = 0
        self.damaged: dict[str, dict[str, str]] = {}   # shard name -> {uid: source} found damaged by plan
        self._index: dict[str, dict] = {}
        self._wanted: dict[str, str] = {}
        self._previous: dict | None = None
        self._part: PartWriter | None = None
        self._lock = None

    def _check_out(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out}: expected a feature store folder (format ser-features/2), found a "
                             "file (a store of an older format?). Move it away or choose another --out.")
        if is_identity_store(self.out):
            raise ValueError(f"--out {self.out}: this is an identity store inside a collection; expected the "
                             f"collection itself. Pass --out {self.out.parent}.")

    def plan(self, rows: pd.DataFrame, *, clean: bool = True) -> tuple[pd.DataFrame, list[dict]]:
        """Split the manifest rows into work and skips.

        Args:
            rows: the manifest rows.
            clean: delete temporary files of dead processes; False where other machines may be writing shards
                into the store now (a ``--shard`` member: a pid is only meaningful on its own machine).

        Returns:
            ``(todo, skips)``: the rows to compute (with a ``source`` column), and skips
            (``id, path, reason, detail``) for rows whose file is missing. ``self.reused`` counts the rest.

        Raises:
            ValueError: ``out`` is not a collection folder.
        """
        self._check_out()
        for _ in range(3):  # held until the build finishes; a removal between creating and locking: again
            store = IdentityStore.create(self.store_dir, self.identity)
            self._lock = hold_store(self.store_dir)
            if self._lock is not None:
                break
        else:
            raise OSError(f"{self.store_dir}: removed while this run opened it, three times; expected no "
                          "`features.stores remove` of it during an extraction. Rerun.")
        for folder in (self.out, self.store_dir, self.store_dir / SHARDS) if clean else ():
            remove_dead_temporaries(folder)
        try:
            self._previous = read_current(self.out)
        except ValueError as err:  # rewritten by finish
            print(f"warning: {err}", file=sys.stderr)
            self._previous = None
        self._index, self.damaged = store.load(verify=True)
        for shard, bad in self.damaged.items():
            if not bad:
                print(f"warning: {self.store_dir / SHARDS / shard} cannot be read, and no index says what it held (a "
                      "shard damaged before a run indexed it): whatever it held is recomputed where wanted. Delete "
                      "the file.", file=sys.stderr)
                continue
            print(f"warning: {self.store_dir / SHARDS / shard} changed since it was written: {len(bad)} damaged "
                  f"entries (e.g. {next(iter(bad))!r}) are not reused but recomputed where wanted.", file=sys.stderr)
        sources, skips = [], []
        for uid, path in zip(rows["id"], rows["path"], strict=True):
            try:
                sources.append(source_hash(path))
            except OSError as err:
                sources.append(None)
                skips.append({"id": uid, "path": path, "reason": "missing", "detail": str(err)})
        rows = rows.assign(source=sources)
        rows = rows[rows["source"].notna()]
        self.wanted_rows = rows
        self._wanted = dict(zip(rows["id"], rows["source"], strict=True))
        held = entries_by_uid(self._index)
        done = [s in held.get(u, {}) for u, s in self._wanted.items()]
        damaged = {(u, s) for bad in self.damaged.values() for u, s in bad.items()}
        self.corrupt = sum(1 for (u, s), ok in zip(self._wanted.items(), done, strict=True)
                           if not ok and (u, s) in damaged)
        self.reused = sum(done)
        return rows.loc[~np.array(done, dtype=bool)], skips

    def reserve_part(self) -> Path:
        """A fresh shard path in the identity store (for a worker process's :class:`PartWriter`)."""
        return self.store_dir / SHARDS / new_shard_name()

    def add(self, uid: str, *, source: str, roll: bool = True, **kw) -> None:
        """Store one computed utterance (arguments as for :meth:`PartWriter.add`) in rolling shards: with
        ``roll``, the shard is published once it holds ``part_entries``; otherwise when :meth:`roll` says."""
        if self._part is None:
            self._part = PartWriter(self.reserve_part(), self.meta)
        self._part.add(uid, source=source, **kw)
        if roll:
            self.roll()

    def roll(self) -> None:
        """Publish the current shard if it holds ``part_entries`` utterances or more."""
        if self._part is not None and self._part.count >= self.part_entries:
            self._publish()

    def _publish(self) -> None:
        part, self._part = self._part.close(), None
        if part is not None:
            self.absorb(part)

    def absorb(self, shard: str | os.PathLike) -> None:
        """Register a published shard of this identity store (its entries become available; nothing is copied).

        Raises:
            ValueError: the shard lies outside this build's identity store.
        """
        shard = Path(shard)
        if shard.parent.resolve() != (self.store_dir / SHARDS).resolve():
            raise ValueError(f"{shard}: expected a shard of {self.store_dir / SHARDS} (from reserve_part), found "
                             "another folder.")
        st = shard.stat()
        self._index[shard.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "entries": scan_shard(shard)}

    def discard(self) -> None:
        """Give up the shard being written after a failure (see :meth:`PartWriter.discard`)."""
        if self._part is not None:
            self._part.discard()
            self._part = None

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def flush(self) -> None:
        """Publish the shard being written, if any."""
        if self._part is not None:
            self._publish()

    def view_entries(self) -> dict[str, str]:
        """``{uid: source}`` the view would hold if the build finished now: the wanted rows the published shards
        hold (:meth:`flush` first to count the shard being written)."""
        held = entries_by_uid(dict(sorted(self._index.items())))
        return {u: s for u, s in self._wanted.items() if s in held.get(u, {})}

    def finish(self, *, view: bool = True) -> dict:
        """Publish the last shard, then update ``index.json`` and ``current.json`` where they change.

        Args:
            view: False: publish the last shard only (a ``--shard`` member; the final call indexes and writes the
                view).

        Returns:
            ``{"stored", "removed", "corrupt"}``: entries in the new view, entries of the previous view no
            longer wanted, damaged entries recomputed.
        """
        self.flush()
        if not view:
            self._release()
            return {"stored": None, "removed": 0, "corrupt": self.corrupt}
        entries = self.view_entries()
        removed = len(set(self._previous["entries"]) - set(entries)) if self._previous else 0
        IdentityStore(self.store_dir).write_index(dict(sorted(self._index.items())))
        write_current(self.out, self.store_dir.name, entries)
        self._release()
        return {"stored": len(entries), "removed": removed, "corrupt": self.corrupt}


def publish(stage: str, build: StoreBuild, *, out, skips, skipped: list[dict], computed: int,
           audio_seconds: float) -> dict:
    """Publish the build, write the skips file and print and return the run's summary (``computed, reused,
    skipped, stored, removed, corrupt, audio_seconds``).

    Raises:
        ValueError: every manifest row was skipped (audio missing or unusable: a disk not mounted, a manifest of
            another machine): the view is left as it was instead of being emptied; what was computed is kept.
    """
    build.flush()
    if skipped and not build.view_entries():
        build.finish(view=False)
        report = write_skips(skips or f"{out}.skips.csv", skipped)
        reasons = pd.Series([s["reason"] for s in skipped]).value_counts().to_dict()
        raise ValueError(f"{stage}: expected at least one usable manifest row, found all {len(skipped)} skipped "
                         f"({', '.join(f'{n} {r}' for r, n in reasons.items())}; e.g. {skipped[0].get('path')}: "
                         f"{skipped[0].get('detail')}). The view of {out} was left as it was; see {report}. Check that "
                         "the audio is where the manifest says (a disk not mounted?), then rerun.")
    counts = build.finish()
    skips = write_skips(skips or f"{out}.skips.csv", skipped)
    print(f"{stage}: {computed} computed ({audio_seconds:.1f} s of audio), {build.reused} reused, {len(skipped)} "
          f"skipped (see {skips}), {counts['removed']} removed, {counts['corrupt']} corrupt (recomputed); "
          f"{counts['stored']} utterances in {out} (store {build.store_dir.name})")
    return {"computed": computed, "reused": build.reused, "skipped": len(skipped), "stored": counts["stored"],
            "removed": counts["removed"], "corrupt": counts["corrupt"], "audio_seconds": round(audio_seconds, 2)}


def add_store_args(parser) -> None:
    """The arguments every store-building command takes: manifests, output collection, skips file."""
    parser.add_argument("--manifest", action="append", required=True, type=existing_file,
                        help="manifest CSV (repeatable)")
    parser.add_argument("--out", required=True, type=output_dir,
                        help="the feature store folder to build or update (one identity store per settings inside)")
    parser.add_argument("--skips", type=output_file, help="CSV of rows not stored (default: <out>.skips.csv)")
