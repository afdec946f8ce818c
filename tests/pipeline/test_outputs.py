"""Output folders replaced whole: failures keep the old output; leftovers of dead runs are recovered or cleaned."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.outputs import replaced_whole


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


@pytest.mark.parametrize("name", ["out", "out[1]"])  # a glob character in the name
def test_a_swap_killed_between_its_renames_is_put_back_and_leftovers_cleaned(tmp_path, name):
    out = tmp_path / name
    with replaced_whole(out) as staging:
        (staging / "a.txt").write_text("first")
    # as a run killed between its two renames leaves it: the old output aside, nothing at out
    os.replace(out, tmp_path / f".{name}.old-{_dead_pid()}")
    (tmp_path / f".{name}.tmp-{_dead_pid()}").mkdir()  # and a dead run's staging folder
    (tmp_path / f".{name}.tmp-{os.getpid()}").mkdir()  # a killed run that had this process's pid
    with pytest.raises(RuntimeError), replaced_whole(out):
        raise RuntimeError("failed midway")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    with replaced_whole(out) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_a_symbolic_link_or_a_file_is_refused_before_any_work(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "file").write_text("x")
    for out, message in [(tmp_path / "link", "symbolic link"), (tmp_path / "file", "is a file")]:
        with pytest.raises(NotADirectoryError, match=message), replaced_whole(out):
            pytest.fail("the block ran")
    assert (target / "keep.txt").read_text() == "x" and (tmp_path / "link").is_symlink()


def test_a_relative_out_works_and_the_working_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with replaced_whole("out/") as staging:
        (staging / "a.txt").write_text("x")
    assert (tmp_path / "here" / "out" / "a.txt").read_text() == "x"
    (tmp_path / "alias").symlink_to(tmp_path)  # the working directory reached through a symbolic link
    for out in (".", "..", str(tmp_path / "alias" / "here")):
        with pytest.raises(NotADirectoryError, match="working directory"), replaced_whole(out):
            pytest.fail("the block ran")
