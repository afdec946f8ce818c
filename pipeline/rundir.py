"""Transactional run directories: a trainer writes a whole run beside the old one and swaps it in when complete.

Every trainer (``heads.train``, ``baselines.train``) writes ``metrics.json``, ``predictions.csv``,
``history.csv``, ``layer_weights.json`` and ``models/`` into a staging sibling ``.<name>.tmp-<pid>`` of the
run directory ``<name>``. Only when the run is complete does :func:`staged_run` commit it, by renames:

1. the old run ``<name>`` → ``.<name>.old-<pid>`` (if there is one),
2. the staging folder → ``<name>``,
3. the old run is deleted.

A failure or kill before step 1 leaves the old run exactly as it was (the staging folder is removed on a
failure; after a kill it stays until the next run into the same place removes it). A kill between steps 1
and 2 leaves no ``<name>`` but a whole ``.<name>.old-<pid>``: :func:`recover_run` (called by every reader,
``pipeline.runs.load_run`` and ``heads.runs.load_run``, and by the next trainer) renames it back. A kill
during step 3 leaves a stale ``.old-<pid>`` beside a complete run, which the next run removes.

Files in the old run directory that no trainer writes (such as the ``.gitignore`` DVC keeps beside its
outputs) are carried into the new one.

Example:
    >>> with staged_run("data/runs/conv_egemaps") as tmp:      # doctest: +SKIP
    ...     write_everything_into(tmp)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

#: What a trainer writes into a run directory; everything else in an old run is carried over.
RUN_ENTRIES = frozenset({"metrics.json", "predictions.csv", "history.csv", "layer_weights.json", "models"})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(out: Path, tag: str) -> list[Path]:
    found = []
    for path in out.parent.glob(f".{out.name}.{tag}-*"):
        suffix = path.name.rsplit("-", 1)[-1]
        if suffix.isdigit():
            found.append(path)
    return sorted(found, key=lambda p: p.stat().st_mtime)


def recover_run(out: str | os.PathLike) -> Path:
    """Put back a run left half-swapped by a killed trainer; return the run directory's path.

    When ``out`` is missing and a ``.<name>.old-<pid>`` sibling holds a previous run (a kill between the two
    renames of a commit), that run is renamed back to ``out``. Nothing else is touched.
    """
    out = Path(out)
    if not out.exists():
        olds = [p for p in _siblings(out, "old")
                if (p / "metrics.json").is_file() and not _alive(int(p.name.rsplit("-", 1)[-1]))]
        if olds:
            os.replace(olds[-1], out)
    return out


def clean_stale(out: str | os.PathLike) -> list[Path]:
    """Remove staging folders of trainers that no longer run and old runs already replaced; return them."""
    out = recover_run(out)
    removed = []
    for path in _siblings(out, "tmp"):
        if not _alive(int(path.name.rsplit("-", 1)[-1])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if out.exists():
        for path in _siblings(out, "old"):
            if _alive(int(path.name.rsplit("-", 1)[-1])):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _commit(tmp: Path, out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; expected a run directory (or nothing) there. Remove the file "
                                 "or choose another --out.")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        for entry in out.iterdir():
            if entry.name not in RUN_ENTRIES and not (tmp / entry.name).exists():
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True)
                else:
                    shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_run(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh staging folder for the run ``out``; on normal exit swap it in, on an exception remove it.

    Raises:
        NotADirectoryError: ``out`` (or a folder above it) is an existing file; checked before any work.
    """
    out = Path(out)
    for candidate in (out, *out.parents):
        if candidate.exists() and not candidate.is_dir():
            raise NotADirectoryError(f"{candidate} is a file; expected a run directory {out} (or nothing) "
                                     "there. Remove the file or choose another --out.")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
