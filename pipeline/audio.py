"""Audio reading shared by every stage: header inspection, validation, loading and streaming.

Everything goes through libsndfile (``soundfile``), so any container it reads is accepted whatever the
file's extension (WAV, FLAC, AIFF data named ``.wav``, OGG, ...). Resampling uses ``soxr``; there is no
torchaudio dependency.

Example:
    >>> info = audio_info("Actor_01/03-01-01-01-01-01-01.flac")   # doctest: +SKIP
    >>> x = load_audio(info.path, sample_rate=16000)                  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

#: Sample rate every stage works at unless an encoder asks for another.
SAMPLE_RATE = 16000
#: Shortest audio any feature path accepts, in seconds (openSMILE's eGeMAPS needs about 0.1 s): the manifest
#: rejects shorter clips as ``too_short`` and ``heads.predict`` refuses shorter recordings, so no stage dead-ends on
#: a clip another one accepted.
MIN_SECONDS = 0.25

_FLOAT_SUBTYPES = {"FLOAT", "DOUBLE"}


class AudioError(ValueError):
    """A file that cannot be used as audio; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says about it."""

    path: str
    frames: int
    sample_rate: int
    channels: int
    format: str
    subtype: str

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Read a file's header (not its samples).

    Raises:
        AudioError: ``empty`` for a zero-byte file, ``unreadable`` when libsndfile cannot parse it,
            ``no_samples`` when the header announces no frames.
    """
    path = str(path)
    if os.path.getsize(path) == 0:
        raise AudioError("empty", f"{path}: file has zero bytes; expected audio data. Re-download the file.")
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError("unreadable", f"{path}: libsndfile cannot read it ({err}); expected audio "
                                       "in a container libsndfile supports (WAV, FLAC, AIFF, OGG).") from err
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError("no_samples", f"{path}: header announces {info.frames} frames at "
                                       f"{info.samplerate} Hz; expected a non-empty recording.")
    return AudioInfo(path, int(info.frames), int(info.samplerate), int(info.channels), info.format, info.subtype)


#: Chunk sizes that streaming writers put in a header when the length is unknown; not a sign of truncation.
_UNKNOWN_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF}


def check_complete(info: AudioInfo) -> None:
    """Refuse a file whose data chunk is shorter than its header announces (a truncated copy or download).

    libsndfile reads such a WAV or AIFF up to where the data stops and reports the mismatch in its log
    (``data : 64000 (should be 31978)``); without this check the file would be used at part of its length.

    Raises:
        AudioError: ``truncated``, with the announced and the present bytes.
    """
    try:
        log = sf.info(info.path).extra_info
    except (sf.LibsndfileError, RuntimeError):
        return
    for line in log.splitlines():
        match = re.match(r"\s*(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", line)
        if match and int(match[2]) not in _UNKNOWN_SIZES and int(match[3]) < int(match[2]):
            raise AudioError("truncated", f"{info.path}: the header announces {int(match[2])} bytes of audio, "
                                          f"the file holds {int(match[3])}; expected a complete file (it would be "
                                          "used at part of its length). Copy or download it again.")


def check_samples(info: AudioInfo, *, block_frames: int = 65536) -> None:
    """Scan the samples for problems that no header shows.

    Integer PCM cannot hold NaN or infinity, so the scan of such files stops at the first block with a
    non-zero sample (usually the first); float files are read through to find non-finite samples.

    Raises:
        AudioError: ``corrupt`` when decoding fails part-way, ``non_finite`` for NaN/inf samples,
            ``silent`` when every sample is zero.
    """
    need_full = info.subtype in _FLOAT_SUBTYPES
    any_signal = False
    try:
        for block in sf.blocks(info.path, blocksize=block_frames, dtype="float32", always_2d=True):
            if need_full and not np.isfinite(block).all():
                raise AudioError("non_finite", f"{info.path}: contains NaN or infinite samples; "
                                               "expected finite audio. Re-export the file.")
            if not any_signal and np.any(block):
                any_signal = True
                if not need_full:
                    return
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError("corrupt", f"{info.path}: decoding failed part-way ({err}); the file is "
                                    "truncated or corrupt. Re-download it.") from err
    if not any_signal:
        raise AudioError("silent", f"{info.path}: every sample is zero; expected a recording with signal.")


def to_mono(x: np.ndarray) -> np.ndarray:
    """Average channels: ``[N, C]`` or ``[N]`` to ``[N]`` float32."""
    x = np.asarray(x, dtype=np.float32)
    return x.mean(axis=1, dtype=np.float32) if x.ndim == 2 else x


def resample(x: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Resample a mono signal with soxr (high quality); a no-op when the rates agree."""
    if source_rate == target_rate:
        return np.ascontiguousarray(x, dtype=np.float32)
    return soxr.resample(x, source_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def load_audio(path: str | os.PathLike, *, sample_rate: int = SAMPLE_RATE,
               offset_s: float = 0.0, duration_s: float | None = None) -> np.ndarray:
    """Load a file as mono float32 at ``sample_rate``.

    Args:
        path: any file libsndfile reads.
        sample_rate: rate to resample to.
        offset_s: seconds to skip at the start.
        duration_s: seconds to read (``None``: to the end).

    Returns:
        ``np.ndarray`` of shape ``[N]``, float32.

    Raises:
        AudioError: the file is empty, unreadable or has no samples in the requested range.
    """
    info = audio_info(path)
    start = int(round(offset_s * info.sample_rate))
    stop = None if duration_s is None else start + int(round(duration_s * info.sample_rate))
    try:
        x, rate = sf.read(info.path, start=start, stop=stop, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError("corrupt", f"{info.path}: decoding failed ({err}); the file is truncated "
                                    "or corrupt.") from err
    if len(x) == 0:
        raise AudioError("no_samples", f"{info.path}: no samples between {offset_s} s and "
                                       f"{'the end' if duration_s is None else f'{offset_s + duration_s} s'}"
                                       f" (file lasts {info.duration_s:.2f} s).")
    return resample(to_mono(x), rate, sample_rate)


def stream_audio(path: str | os.PathLike, *, sample_rate: int = SAMPLE_RATE,
                 block_seconds: float = 30.0) -> Iterator[np.ndarray]:
    """Yield a file as consecutive mono float32 blocks at ``sample_rate``, in bounded memory.

    The blocks are contiguous: concatenated they equal a streaming resample of the whole file, so
    consumers can cut their own (overlapping) windows from them without edge artefacts.
    """
    info = audio_info(path)
    blocksize = max(1, int(block_seconds * info.sample_rate))
    resampler = None if info.sample_rate == sample_rate else soxr.ResampleStream(
        info.sample_rate, sample_rate, 1, dtype="float32", quality="HQ")
    try:
        blocks = sf.blocks(info.path, blocksize=blocksize, dtype="float32", always_2d=True)
        for block in blocks:
            mono = to_mono(block)
            out = mono if resampler is None else resampler.resample_chunk(mono)
            if len(out):
                yield out
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError("corrupt", f"{info.path}: decoding failed ({err}); the file is truncated "
                                    "or corrupt.") from err
    if resampler is not None:
        tail = resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        if len(tail):
            yield tail


def write_audio(path: str | os.PathLike, x: np.ndarray, sample_rate: int) -> Path:
    """Write float audio; the format follows the extension (``.flac`` as 16-bit PCM)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    subtype = "PCM_16" if path.suffix.lower() in {".flac", ".wav"} else None
    sf.write(str(path), np.asarray(x, dtype=np.float32), sample_rate, subtype=subtype)
    return path
