"""Helpers for the stages that spread work over processes (feature extraction, head training)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pid_alive(pid: str | int) -> bool:
    """Whether the process that owns a temporary file or folder (pid in its name) still runs."""
    try:
        os.kill(int(pid), 0)
        return True
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


def owner_gone(pid: str | int) -> bool:
    """Whether a leftover staging or replaced folder (its writer's pid in its name) belongs to no running writer:
    its pid runs no process, or is this process's own. A process cleans up before it stages anything, so a
    leftover under its own pid is a killed run's whose pid was reused (in containers, often)."""
    return str(pid).isdigit() and int(pid) == os.getpid() or not pid_alive(pid)


def die_with_parent(parent: int | None = None) -> None:
    """Make this (worker) process die when its parent does (Linux PR_SET_PDEATHSIG; elsewhere nothing):
    a killed run leaves no orphan computing (or holding a store's lock).

    Args:
        parent: the pid of the process that started this one (``os.getpid()`` there, passed down): if it died
            before the signal was armed, this process has been handed to another parent already and exits now.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _init_pool_worker(parent: int | None, initializer: Callable | None, initargs: tuple) -> None:
    die_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


@contextlib.contextmanager
def worker_pool(max_workers: int, *, mp_context, initializer: Callable | None = None,
                initargs: tuple = ()) -> Iterator[ProcessPoolExecutor]:
    """A ``ProcessPoolExecutor`` whose workers die with this process, and which stops at once when the block
    raises (Ctrl-C included): tasks not started are cancelled and the workers stopped, where the executor's own
    ``with`` would wait for every queued task (its workers turn their own KeyboardInterrupt into a task's result
    and take the next task). What the stopped workers were writing is left to their callers' clean-up (the
    feature store deletes a dead writer's temporary files)."""
    direct = mp_context.get_start_method() in {"fork", "spawn"}  # a forkserver's workers are its children, not ours
    pool = ProcessPoolExecutor(max_workers, mp_context=mp_context, initializer=_init_pool_worker,
                               initargs=(os.getpid() if direct else None, initializer, initargs))
    try:
        yield pool
    except BaseException:
        stop_pool(pool)
        raise
    pool.shutdown(wait=True)


def stop_pool(pool: ProcessPoolExecutor, timeout: float = 10.0) -> None:
    """Cancel ``pool``'s tasks not started and stop its workers now (``terminate_workers`` from Python 3.14; the
    executor has no public way before it)."""
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
        return
    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(timeout)
