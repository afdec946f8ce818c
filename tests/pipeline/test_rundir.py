"""pipeline.rundir: a run is swapped in whole or not at all, and a half-swapped one is put back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.rundir import clean_stale, recover_run, staged_run


def _write(folder, text: str) -> None:
    (folder / "models").mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(text)
    (folder / "models" / "fold_0.json").write_text(text)


def _dead_pid() -> int:
    """The id of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_complete_run_replaces_the_old_and_keeps_foreign_files(tmp_path):
    out = tmp_path / "run"
    _write(out, "old")
    (out / "layer_weights.json").write_text("old weights")  # a trainer output the new run does not write
    (out / ".gitignore").write_text("/models\n")             # not a trainer output: carried over
    with staged_run(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".run.tmp-")
        _write(tmp, "new")
    assert (out / "metrics.json").read_text() == "new" and (out / "models" / "fold_0.json").read_text() == "new"
    assert (out / ".gitignore").read_text() == "/models\n" and not (out / "layer_weights.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failure_leaves_the_old_run_exactly_as_it_was(tmp_path):
    out = tmp_path / "run"
    _write(out, "old")
    with pytest.raises(RuntimeError), staged_run(out) as tmp:
        _write(tmp, "half")
        raise RuntimeError("fold 2 failed")
    assert (out / "metrics.json").read_text() == "old" and (out / "models" / "fold_0.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_kill_between_the_renames_is_recovered(tmp_path):
    out = tmp_path / "run"
    old = tmp_path / f".run.old-{_dead_pid()}"  # what a kill after "old run -> .old-<pid>" leaves
    _write(old, "old")
    assert recover_run(out) == out and (out / "metrics.json").read_text() == "old" and not old.exists()


def test_stale_staging_and_old_runs_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "run"
    _write(out, "current")
    stale_tmp, stale_old = tmp_path / f".run.tmp-{_dead_pid()}", tmp_path / f".run.old-{_dead_pid()}"
    _write(stale_tmp, "killed mid-run")
    _write(stale_old, "replaced")
    live = tmp_path / f".run.tmp-{os.getpid()}"  # a trainer still running: left alone
    live.mkdir()
    assert sorted(clean_stale(out)) == sorted([stale_tmp, stale_old])
    assert (out / "metrics.json").read_text() == "current" and live.exists()


def test_an_existing_file_as_run_directory_is_refused_before_work(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is a file; expected a run directory"), staged_run(tmp_path / "run"):
        pytest.fail("the block must not run")
    assert (tmp_path / "run").read_text() == "not a folder"
