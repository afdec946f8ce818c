"""The hardware choices of extraction and prediction, as Enums (without importing torch, so that command lines
and the benchmark's parent process can name them cheaply)."""

from __future__ import annotations

from enum import StrEnum


class Device(StrEnum):
    """Where the encoder runs: ``auto`` picks CUDA when torch finds a GPU (``cuda:N`` is accepted too)."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class DType(StrEnum):
    """The encoder's compute dtype: ``auto`` picks bfloat16 where it runs fast here (``features.encoder.pick_dtype``)."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"  # CUDA only, norms kept in float32 under autocast
