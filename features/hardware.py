"""The hardware choices of extraction and prediction, as Enums (without importing torch, so that command lines
and the benchmark's parent process can name them cheaply)."""

from __future__ import annotations

import argparse
import contextlib
import platform
import re
from enum import StrEnum
from pathlib import Path


class Device(StrEnum):
    """Where the encoder runs: ``auto`` picks CUDA when torch finds a GPU (``cuda:N`` is accepted too)."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


def device_arg(text: str) -> str:
    """``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (the N-th GPU)."""
    if text in set(Device) or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(Device)} or cuda:N (e.g. cuda:1), found {text!r}")


class DType(StrEnum):
    """The encoder's compute dtype: ``auto`` picks bfloat16 where it runs fast here (``features.encoder.pick_dtype``)."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"  # CUDA only, norms kept in float32 under autocast


def host() -> dict:
    """The machine that computes: ``{"host", "cpu"}`` (its name and CPU model), recorded with what it computed."""
    return {"host": platform.node(), "cpu": cpu_model()}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what the platform says)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
