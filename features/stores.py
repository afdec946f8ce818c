"""List feature stores and remove the ones no collection uses.

Every extraction's ``--out`` is a collection holding one identity store per feature settings (see
:mod:`features.store`); switching encoders keeps the old store, so that switching back computes nothing. These
stores are large (about 1 MB per second of audio per encoder with all layers); this command shows them and
removes the ones that no collection's ``current.json`` points to. Only folders whose ``store.json`` a feature
extraction wrote are stores; one in use (locked by a run or a reader) is never removed, nor, by ``--unused``, one
holding shards not yet indexed (``--shard`` work waiting for its final call, or a killed run's). ``--dry-run``
applies the same checks.

Example:
    python -m features.stores list                         # everything below data/features
    python -m features.stores remove --unused --dry-run    # what would go, and how much
    python -m features.stores remove data/features/wav2vec2-base/hubert-base-float32-0123456789ab
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd

from features.store import (
    CURRENT,
    FEATURE_ENCODER_CHOICE,
    INDEX,
    SHARDS,
    STORE_JSON,
    IdentityStore,
    dir_size,
    is_identity_store,
    read_current,
)
from pipeline.processes import pid_alive

DEFAULT_ROOT = "data/features"
#: Part of the name a store folder takes while it is being deleted (skipped by ``list``, cleaned by ``remove``).
REMOVING = ".removing-"


def identity_stores(root: Path) -> Iterator[Path]:
    """Identity store folders at or below ``root`` (folders being removed are left out)."""
    for folder, subdirs, _ in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if REMOVING not in d)
        if is_identity_store(folder):
            subdirs[:] = []
            yield Path(folder)


def current_of(store: Path) -> bool:
    """Whether ``store`` is the current store of its collection (its parent folder's ``current.json``).

    Raises:
        ValueError: that ``current.json`` is damaged (which store is current is then unknown).
    """
    current = read_current(store.parent)
    return current is not None and current["store"] == store.name


def pending_shards(store: Path) -> int:
    """Shards of ``store`` that its index does not list yet: work of ``--shard`` members waiting for the final
    call without ``--shard``, or of a killed run that a rerun resumes from. Not unused."""
    s = IdentityStore(store)
    return len({p.name for p in s.published()} - set(s.read_index() or {}))


def _layers(layers) -> str:
    if isinstance(layers, list) and len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers)) if isinstance(layers, list) else str(layers)


def human(size: int) -> str:
    """Bytes as ``1.2 GB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # unreachable


def store_summary(store: Path) -> dict:
    """One row of ``list``: ``path, kind, encoder, dtype, layers, entries, size, current``.

    Raises:
        ValueError: the store's ``store.json`` (or its collection's ``current.json``) is damaged.
    """
    s = IdentityStore(store)
    index, _ = s.load()
    entries = sum(len(rec["entries"]) for rec in index.values())
    ident = s.identity
    return {"path": str(store), "kind": ident.get("kind"), "encoder": ident.get("encoder"),
            "dtype": ident.get("dtype"), "layers": _layers(ident.get("layers")), "entries": entries,
            "size": dir_size(store), "current": _current_word(store)}


def _current_word(store: Path) -> str:
    try:
        return "yes" if current_of(store) else "no"
    except ValueError:  # the collection's current.json is damaged: reported once by list_stores
        return "unknown"


def list_stores(root: Path) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Every identity store below ``root`` as a table, one line per collection (its current store and view), and
    the problems met (unreadable stores or views, views naming a missing store)."""
    rows, collections, problems = [], [], []
    for store in identity_stores(root):
        try:
            rows.append(store_summary(store))
        except (OSError, ValueError) as err:
            problems.append(str(err))
    for current in sorted(root.rglob(CURRENT)):
        try:
            view = read_current(current.parent)
        except ValueError as err:
            problems.append(str(err))
            continue
        if view is not None and not is_identity_store(current.parent / view["store"]):
            problems.append(f"{current} names the store {view['store']!r}, which is not there; rerun the extraction "
                            f"with --out {current.parent} to recompute it.")
        elif view is not None:
            collections.append(f"collection {current.parent}: current store {view['store']}, "
                               f"{len(view['entries'])} entries in its view")
    columns = ["path", "kind", "encoder", "dtype", "layers", "entries", "size", "current"]
    return pd.DataFrame(rows, columns=columns), collections, problems


def remove_store(store: Path, *, dry_run: bool = False) -> int:
    """Delete one identity store (locked exclusively, renamed aside, then deleted); returns its size.

    Raises:
        ValueError: not a feature store (its ``store.json`` is not this format's), a symbolic link, or its
            collection's current store (checked again once it is locked), or which store is current is unknown.
        BlockingIOError: an extraction or an open reader is using it (a dry run checks too).
    """
    if store.is_symlink():
        raise ValueError(f"{store}: a symbolic link to {os.readlink(store)}; expected the store folder itself. "
                         "Pass the folder it points to.")
    IdentityStore(store)  # refuses a folder whose store.json a feature extraction did not write
    if current_of(store):
        raise ValueError(f"{store} is the current store of {store.parent} (its last run's features); expected a "
                         "store no collection uses. Run the extraction with other settings first, or remove the "
                         "whole collection.")
    size = dir_size(store)
    with open(store / STORE_JSON, "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BlockingIOError(f"{store}: an extraction or a reader (training, prediction) is using it "
                                  "(locked); expected an idle store. Retry when it has finished.") from None
        if dry_run:  # it could be removed now (the lock is released on return)
            return size
        if current_of(store):  # a run that finished since the check above made it current again
            raise ValueError(f"{store} became the current store of {store.parent} while it was being removed; "
                             "expected a store no collection uses. It is kept.")
        aside = store.with_name(f".{store.name}{REMOVING}{os.getpid()}")
        os.replace(store, aside)  # no longer a store for anyone, even if the deletion below is cut short
    shutil.rmtree(aside)
    return size


#: The name :func:`remove_store` gives a store it is deleting: ``.<store>.removing-<pid>``.
_ASIDE = re.compile(rf"\..+{re.escape(REMOVING)}(\d+)")


def _leftovers(root: Path) -> list[Path]:
    """Folders a killed ``remove`` left half-deleted: named as :func:`remove_store` names them, their pid gone,
    real folders (not links), holding a ``store.json`` or nothing else than its parts."""
    found = []
    for folder, subdirs, _ in os.walk(root):
        for d in list(subdirs):
            if REMOVING in d:
                subdirs.remove(d)
                match, path = _ASIDE.fullmatch(d), Path(folder) / d
                if match and not path.is_symlink() and not pid_alive(match.group(1)) and _store_parts_only(path):
                    found.append(path)
    return found


#: What an identity store folder holds (and the temporary files of their atomic writes).
_PARTS = {STORE_JSON, INDEX, SHARDS, FEATURE_ENCODER_CHOICE}


def _store_parts_only(path: Path) -> bool:
    """Whether ``path`` holds nothing but what a store holds (a half-deleted store may have lost any of it)."""
    try:
        return all(entry.name.split(".tmp-")[0] in _PARTS for entry in path.iterdir())
    except OSError:
        return False


def cmd_list(root: Path) -> int:
    table, collections, problems = list_stores(root)
    for line in collections:
        print(line)
    if table.empty:
        print(f"no feature stores below {root}")
    else:
        shown = table.assign(size=table["size"].map(human)).astype(str)
        left = {c: f"{{:<{max(len(c), shown[c].str.len().max())}}}".format for c in shown.columns}
        print(shown.to_string(index=False, justify="left", formatters=left))
        print(f"{len(table)} stores, {human(int(table['size'].sum()))}; "
              f"{int((table['current'] == 'yes').sum())} current, {int((table['current'] == 'no').sum())} unused")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


def cmd_remove_unused(root: Path, dry_run: bool) -> int:
    verb = "would remove" if dry_run else "removed"
    total, status = 0, 0
    for store in identity_stores(root):
        try:
            if current_of(store):
                continue
            pending = pending_shards(store)
            if pending:
                print(f"kept {store}: {pending} shards not yet indexed (a --shard run waiting for its final call "
                      "without --shard, or a killed run that a rerun resumes); remove it by name to discard them")
                continue
            size = remove_store(store, dry_run=dry_run)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            status = 1
            continue
        print(f"{verb} {store} ({human(size)})")
        total += size
    for debris in _leftovers(root):
        size = dir_size(debris)
        try:
            if not dry_run:
                shutil.rmtree(debris)
        except OSError as err:
            print(f"error: {debris}: cannot remove what an interrupted removal left ({err})", file=sys.stderr)
            status = 1
            continue
        print(f"{verb} {debris} ({human(size)}, left by an interrupted removal)")
        total += size
    print(f"{verb} {human(total)} in all" if total else f"no unused stores below {root}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m features.stores", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="every collection's identity stores below ROOT")
    ls.add_argument("root", nargs="?", default=DEFAULT_ROOT, metavar="ROOT", help="default: %(default)s")
    rm = sub.add_parser("remove", help="remove one identity store, or (--unused) every one no collection uses")
    rm.add_argument("path", nargs="?", metavar="PATH", help="an identity store; with --unused: the ROOT to search "
                                                             f"(default {DEFAULT_ROOT})")
    rm.add_argument("--unused", action="store_true", help="remove every store no collection's current.json names")
    rm.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    a = p.parse_args(argv)
    if a.command == "list":
        root = Path(a.root)
        if not root.is_dir():
            p.error(f"ROOT {root}: expected a folder holding feature stores, found nothing there.")
        return cmd_list(root)
    if a.unused:
        root = Path(a.path or DEFAULT_ROOT)
        if not root.is_dir():
            p.error(f"ROOT {root}: expected a folder holding feature stores, found nothing there.")
        return cmd_remove_unused(root, a.dry_run)
    if a.path is None:
        p.error("remove: expected PATH (an identity store) or --unused [ROOT].")
    store = Path(os.path.abspath(a.path))  # `remove .` from inside a store names the folder
    if not is_identity_store(store):
        p.error(f"remove {store}: expected an identity store (a folder holding {STORE_JSON}, as `list` shows), "
                "found none there.")
    try:
        size = remove_store(store, dry_run=a.dry_run)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{'would remove' if a.dry_run else 'removed'} {store} ({human(size)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
