"""Worker pools: a raising block (Ctrl-C) stops the pool at once; a killed parent takes its workers with it."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.processes import pid_alive, worker_pool

FORK = multiprocessing.get_context("fork")


def _mark_and_sleep(folder: str, index: int) -> int:
    Path(folder, f"{index}.{os.getpid()}").touch()
    time.sleep(30)
    return index


def _running(pid: int) -> bool:
    """Alive and not a zombie (a reaped-later child of a dead parent is not running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return pid_alive(pid) if not Path("/proc").is_dir() else False
    return state not in {"Z", "X"}


def _wait_for(predicate, seconds: float = 20.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_raising_block_cancels_queued_tasks_and_stops_the_workers(tmp_path):
    """The executor's own ``with`` would wait for all 8 tasks (4 rounds of 30 s); this one stops the 2 running."""
    with pytest.raises(KeyboardInterrupt), worker_pool(2, mp_context=FORK) as pool:
        futures = [pool.submit(_mark_and_sleep, str(tmp_path), i) for i in range(8)]
        assert _wait_for(lambda: len(list(tmp_path.iterdir())) == 2)
        raise KeyboardInterrupt
    started = list(tmp_path.iterdir())
    pids = {int(p.name.split(".")[1]) for p in started}
    assert len(pids) == 2 and _wait_for(lambda: not any(_running(p) for p in pids), 10)
    assert all(f.done() for f in futures)
    time.sleep(0.5)
    assert len(list(tmp_path.iterdir())) == 2  # no queued task ever started


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_killed_parent(tmp_path):
    script = textwrap.dedent(f"""
        import multiprocessing, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_processes import _mark_and_sleep
        from pipeline.processes import worker_pool
        with worker_pool(2, mp_context=multiprocessing.get_context("fork")) as pool:
            for i in range(2):
                pool.submit(_mark_and_sleep, {str(tmp_path)!r}, i)
            time.sleep(60)
    """)
    root = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert _wait_for(lambda: len(list(tmp_path.iterdir())) == 2, 60)
        pids = {int(p.name.split(".")[1]) for p in tmp_path.iterdir()}
        assert all(_running(p) for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_for(lambda: not any(_running(p) for p in pids), 10)
    finally:
        parent.kill()
