"""Output folders replaced whole: a stage writes into a staging folder beside its ``--out`` and swaps it in only
when it has finished, so a killed or failed run leaves the previous output exactly as it was."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.processes import pid_alive


def _leftovers(out: Path) -> Iterator[Path]:
    """Staging and replaced folders beside ``out`` whose writer no longer runs."""
    for path in out.parent.glob(f".{out.name}.*-*"):
        tag, _, pid = path.name[len(out.name) + 2:].rpartition("-")
        if tag in {"tmp", "old"} and pid.isdigit() and not pid_alive(pid):
            yield path


@contextlib.contextmanager
def replaced_whole(out: str | os.PathLike, *, carry: Callable[[Path], bool] = lambda entry: False) -> Iterator[Path]:
    """Yield an empty staging folder for ``out``; on normal exit it replaces ``out``, on an exception it is
    removed. Entries of the old ``out`` that the new output lacks and ``carry(entry)`` accepts (a user's notes, a
    ``.gitignore``) are copied into the new one first. Dead runs' staging folders beside ``out`` are removed, and a
    previous output a run was killed while swapping out is put back.

    Raises:
        NotADirectoryError: ``out`` is an existing file (checked before any work).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; expected an output folder (or nothing) there. Remove the file "
                                 "or choose another --out.")
    out.parent.mkdir(parents=True, exist_ok=True)
    stale = sorted(_leftovers(out), key=lambda p: p.stat().st_mtime)
    olds = [p for p in stale if p.name.startswith(f".{out.name}.old-")]
    if not out.exists() and olds:  # killed between its two renames: the previous output goes back first
        os.replace(olds[-1], out)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            for entry in out.iterdir():
                if carry(entry) and not (tmp / entry.name).exists():
                    if entry.is_dir():
                        shutil.copytree(entry, tmp / entry.name, symlinks=True)
                    else:
                        shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
