"""Helpers for the stages that spread work over processes (feature extraction, head training)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal


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


def die_with_parent() -> None:
    """Make this (worker) process die when its parent does (Linux PR_SET_PDEATHSIG; elsewhere nothing):
    a killed run leaves no orphan computing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
