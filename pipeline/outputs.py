"""Output folders replaced whole: a stage writes into a staging folder beside its ``--out`` and swaps it in only
when it has finished, so a killed or failed run leaves the previous output exactly as it was."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.processes import owner_gone


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def leftovers(out: Path, *tags: str) -> list[Path]:
    """Staging (``.<name>.tmp-<pid>``) and replaced (``.<name>.old-<pid>``) folders beside ``out``, of ``tags``
    (both by default), whose writer no longer runs (``owner_gone``), oldest first."""
    found = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        tag, _, pid = path.name[len(out.name) + 2:].rpartition("-")
        if tag in (tags or ("tmp", "old")) and pid.isdigit() and owner_gone(pid):
            with contextlib.suppress(OSError):
                found.append((path.lstat().st_mtime, path))
    return [path for _, path in sorted(found)]


def put_back(out: Path, accept: Callable[[Path], bool] = lambda path: True) -> Path:
    """Where ``out`` is missing, rename back the newest replaced folder beside it that ``accept`` takes (a run
    killed between the two renames of :func:`swap_in`); returns ``out``."""
    if not out.exists():
        olds = [path for path in leftovers(out, "old") if accept(path)]
        if olds:
            os.replace(olds[-1], out)
    return out


def check_replaceable(out: str | os.PathLike) -> Path:
    """``out`` as an absolute path that :func:`replaced_whole` can replace; call it before any work.

    Raises:
        NotADirectoryError: ``out`` is a file, a symbolic link (replacing it would leave its target stale), the
            working directory or one above it, or a mount point or the root (which cannot be renamed).
    """
    given, out = str(out), Path(os.path.abspath(out))
    if out.is_symlink():
        raise NotADirectoryError(f"--out {given}: expected a folder, found a symbolic link to "
                                 f"{os.readlink(out)}; pass the folder it points to.")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {given} is a file; expected an output folder (or nothing) there. Remove "
                                 "the file or choose another --out.")
    real, cwd = Path(os.path.realpath(out)), Path(os.path.realpath(Path.cwd()))  # through symbolic links too
    if real == cwd or real in cwd.parents:
        raise NotADirectoryError(f"--out {given}: expected a folder of its own, found the working directory (or one "
                                 "above it), which the new output would replace. Pass a folder inside it.")
    if real == real.parent or os.path.ismount(real):
        raise NotADirectoryError(f"--out {given}: expected a folder that can be replaced whole, found a mount point; "
                                 "pass a folder inside it.")
    return out


def refuse_inputs_inside(out: str | os.PathLike, inputs, *, what: str, instead: str) -> None:
    """Refuse an ``--out`` that is, or holds, one of ``inputs`` (paths): replacing it whole would delete them.

    Raises:
        ValueError: naming the first such input, ``what`` it is and the ``--out`` to choose ``instead``.
    """
    target = Path(os.path.abspath(out))
    for path in map(str, inputs):
        here = Path(os.path.abspath(path))
        if here == target or target in here.parents:
            raise ValueError(f"--out {out}: expected a folder of its own, found {what} inside it (e.g. {path}), "
                             f"which the new output (replacing the folder whole) would delete. Choose another "
                             f"--out (e.g. {instead}).")


def swap_in(tmp: Path, out: Path, *, carry: Callable[[Path], bool] = lambda entry: False) -> None:
    """Put the finished folder ``tmp`` in the place of ``out`` (two renames; the old one goes aside as
    ``.<name>.old-<pid>`` and is then removed), first copying into ``tmp`` the entries of the old ``out`` that it
    lacks and ``carry(entry)`` accepts."""
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
    _remove(old)


@contextlib.contextmanager
def replaced_whole(out: str | os.PathLike, *, carry: Callable[[Path], bool] = lambda entry: False) -> Iterator[Path]:
    """Yield an empty staging folder for ``out``; on normal exit it replaces ``out``, on an exception it is
    removed. Entries of the old ``out`` that the new output lacks and ``carry(entry)`` accepts (a user's notes, a
    ``.gitignore``) are copied into the new one first. Dead runs' staging folders beside ``out`` are removed, and a
    previous output a run was killed while swapping out is put back.

    Raises:
        NotADirectoryError: as :func:`check_replaceable` (checked before any work).
    """
    out = check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    put_back(out, accept=lambda path: path.is_dir() and not path.is_symlink())  # the previous output first
    for path in leftovers(out):
        _remove(path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
        swap_in(tmp, out, carry=carry)
    except BaseException:
        _remove(tmp)
        raise


def write_files(files: dict[str | os.PathLike, str]) -> None:
    """Write text files that belong together (a CSV and its sidecar): each is written whole beside its place and
    synced first, then all are renamed into place, so a failure or a kill while writing leaves the earlier files
    as they were (only a kill between the renames, a moment, can leave a new one beside an old one)."""
    staged = []
    try:
        for path, text in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with open(tmp, "w", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            staged.append((tmp, path))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
