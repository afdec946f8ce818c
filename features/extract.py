"""Stage ``extract``: frozen wav2vec2-family hidden states of every manifest row into an HDF5 store.

Each row's audio is decoded (mono, resampled with soxr to the encoder's rate, optionally cropped) in a
background thread, normalised by the encoder's own feature extractor and run through the frozen encoder with
all hidden states. Only inputs of identical length share a batch (GroupNorm: padding would change every frame);
inputs longer than a window are windowed (see :mod:`features.encoder`) and streamed into the store. On CPU the
rows are shared by one single-thread process per core (forked after the model is loaded); on CUDA one process
feeds the GPU, with several decoding threads. The store is built incrementally and kill-safely by
:class:`features.cache.StoreBuild`; rows whose audio cannot be used are listed in the skips report.

Example:
    python -m features.extract --manifest data/manifest.csv --manifest data/augmented/manifest.csv \\
        --out data/features/wav2vec2.h5 --skips data/features/wav2vec2.skips.csv --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from features.cache import PartWriter, StoreBuild, add_store_args, advance, finish, read_manifests
from features.encoder import DEFAULT_ENCODER, Encoder, load_encoder
from pipeline.audio import AudioError, load_audio


def versions() -> dict:
    """Library versions recorded in a store (informative; they do not invalidate it)."""
    import h5py
    import soxr
    import torch
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
            "h5py": h5py.__version__, "soxr": soxr.__version__}


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """``"all"`` or ``"0,6,12"`` -> hidden-state indices, checked against ``num_layers``."""
    layers = list(range(num_layers)) if spec == "all" else [int(s) for s in spec.split(",") if s.strip()]
    if not layers or any(not 0 <= i < num_layers for i in layers):
        raise ValueError(f"--layers {spec!r}: expected 'all' or comma-separated indices in 0..{num_layers - 1}.")
    return layers


def _decode(path: str, enc: Encoder, offset_s: float, max_s: float | None) -> np.ndarray:
    wave = load_audio(path, sample_rate=enc.sample_rate, offset_s=offset_s, duration_s=max_s)
    if not np.isfinite(wave).all():
        raise AudioError("non_finite", f"{path}: NaN or infinite samples; expected finite audio.")
    if len(wave) < enc.receptive_field:
        raise AudioError("too_short", f"{path}: {len(wave)} samples, expected at least {enc.receptive_field} "
                                      "(one encoder frame).")
    return enc.normalise(wave)


@dataclass(frozen=True)
class Job:
    """Settings of the encoding loop (shared by the in-process and the worker-process paths)."""

    layers: list[int]
    offset_s: float = 0.0
    max_s: float | None = None
    batch_seconds: float = 60.0
    decode_workers: int = 1


def decoded(rows: Sequence[dict], enc: Encoder, job: Job, lookahead: int = 16
            ) -> Iterator[tuple[dict, np.ndarray | None, Exception | None]]:
    """Yield ``(row, normalised wave [N] or None, error or None)`` in row order, decoded ahead by threads."""
    with ThreadPoolExecutor(job.decode_workers) as pool:
        it = iter(rows)
        submit = lambda r: (r, pool.submit(_decode, r["path"], enc, job.offset_s, job.max_s))  # noqa: E731
        queue = deque(submit(r) for r in islice(it, lookahead))
        while queue:
            row, future = queue.popleft()
            queue.extend(submit(r) for r in islice(it, 1))
            try:
                yield row, future.result(), None
            except (AudioError, OSError) as err:
                yield row, None, err


def encode_rows(enc: Encoder, rows: Sequence[dict], job: Job, add: Callable[..., None]
                ) -> Iterator[tuple[float, dict | None]]:
    """Encode rows (``id, path, source``): equal-length batches, long inputs windowed and streamed.

    Each result goes to ``add(uid, source=..., frames=... | pieces=..., ...)``; yields, per row,
    ``(seconds of audio encoded, skip record or None)``.
    """
    batch: list[tuple[dict, np.ndarray]] = []

    def flush() -> None:
        if batch:
            states = enc.forward(np.stack([w for _, w in batch]), layers=job.layers)
            for (row, wave), frames in zip(batch, states, strict=True):
                add(row["id"], source=row["source"], frames=frames, path=row["path"],
                    duration_s=len(wave) / enc.sample_rate)
            batch.clear()

    for row, wave, err in decoded(rows, enc, job):
        if err is not None:
            yield 0.0, {"id": row["id"], "path": row["path"], "reason": getattr(err, "reason", "missing"),
                        "detail": str(err)}
            continue
        if batch and (len(wave) != len(batch[0][1]) or (len(batch) + 1) * len(wave) > job.batch_seconds * enc.sample_rate):
            flush()
        if len(wave) <= enc.max_single_samples:
            batch.append((row, wave))
        else:  # long: windowed, streamed piece by piece into the store
            flush()
            add(row["id"], source=row["source"], pieces=enc.iter_hidden_states(wave, layers=job.layers, normalised=True),
                num_frames=enc.num_frames(len(wave)), hidden_size=enc.hidden_size, path=row["path"],
                duration_s=len(wave) / enc.sample_rate)
        yield len(wave) / enc.sample_rate, None
    flush()


_WORKER: dict = {}
_FORK = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _init_worker(enc: Encoder) -> None:
    """Worker process (forked, so the model is shared copy-on-write): one thread, dies with its parent."""
    import torch
    torch.set_num_threads(1)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no orphan outlives a kill
    _WORKER["enc"] = enc


def _work(rows: list[dict], part: str, meta: dict, job: Job) -> tuple[float, int, list[dict]]:
    """One task in a worker: encode ``rows`` into one part file; returns (seconds, computed, skips)."""
    writer = PartWriter(part, meta)
    results = list(encode_rows(_WORKER["enc"], rows, job, writer.add))
    writer.close()
    return sum(s for s, _ in results), sum(k is None for _, k in results), [k for _, k in results if k]


def extract(manifests: Sequence[str | os.PathLike], out: str | os.PathLike, *, encoder: str | Encoder = DEFAULT_ENCODER,
            device: str = "auto", dtype: str = "float32", layers: str = "all", max_seconds: float | None = None,
            offset_seconds: float = 0.0, storage_dtype: str = "float16", skips: str | os.PathLike | None = None,
            chunk_seconds: float = 30.0, batch_seconds: float = 60.0, procs: int | None = None,
            workers: int | None = None, part_entries: int = 16) -> dict:
    """Build or update the wav2vec2 feature store ``out`` for the rows of ``manifests``.

    On CPU, ``procs`` forked processes of one thread each share the rows (faster than one process with
    several threads: no per-op synchronisation, and robust to other load on the machine); on CUDA one process
    feeds the GPU, with ``workers`` decoding threads.

    Args:
        manifests: manifest CSVs (``id, path, ...``), concatenated.
        out: the ``.h5`` store; reused entries are kept, new rows computed, rows no longer listed dropped.
        encoder: hub id or local folder (or an already loaded :class:`~features.encoder.Encoder`, whose own
            device, dtype and window then apply).  device, dtype: see :func:`features.encoder.load_encoder`.
        layers: ``all`` or hidden-state indices ``0,6,12``.
        max_seconds, offset_seconds: crop each file to ``[offset, offset + max)`` seconds (None: to the end).
        storage_dtype: ``float16`` or ``float32`` for frames (pooled statistics are always float32).
        skips: CSV of rows not stored (default ``<out>.skips.csv``).
        chunk_seconds: inputs longer than this (plus 2 x 2 s context) are windowed.
        batch_seconds: most audio per batch of equal-length inputs.
        procs: encoder processes (default: one per core on CPU, 1 on CUDA).
        workers: decoding threads per process (default 1 on CPU, 8 on CUDA).
        part_entries: utterances per part file (the most work a kill can lose).

    Returns:
        ``{"computed", "reused", "skipped", "stored", "removed", "audio_seconds"}``.
    """
    rows = read_manifests(manifests)
    enc = encoder if isinstance(encoder, Encoder) else load_encoder(
        encoder, device=device, dtype=dtype, chunk_seconds=chunk_seconds)
    cuda = enc.device.type == "cuda"
    job = Job(parse_layers(layers, enc.num_layers), offset_seconds, max_seconds, batch_seconds,
              workers or (8 if cuda else 1))
    meta = {"kind": "wav2vec2", "encoder": enc.name, "revision": enc.revision, "sample_rate": enc.sample_rate,
            "layers": job.layers, "dtype": enc.dtype, "storage_dtype": storage_dtype, "max_seconds": max_seconds,
            "offset_seconds": offset_seconds, "chunk_seconds": enc.chunk_seconds,
            "overlap_seconds": enc.overlap_seconds, "frame_stride": enc.stride, "versions": versions()}
    build = StoreBuild(out, meta, part_entries=part_entries)
    todo, skipped = build.plan(rows)
    if build.rebuild_reason:
        print(f"extract: rebuilding {out}: {build.rebuild_reason}")
    total = None
    if "duration_s" in todo:
        todo = todo.sort_values("duration_s", kind="stable", ascending=False)  # equal lengths become neighbours
        seconds = (pd.to_numeric(todo["duration_s"], errors="coerce").fillna(0) - offset_seconds).clip(lower=0)
        total = float(seconds.clip(upper=max_seconds).sum() if max_seconds else seconds.sum())
    records = todo[["id", "path", "source"]].to_dict("records")
    procs = 1 if cuda else (procs or cpu_cores())
    done_s, computed = 0.0, 0
    with tqdm(total=total, unit="s", unit_scale=True, desc="extract", disable=not records) as bar:
        if procs > 1 and len(records) > 1:
            size = max(1, min(part_entries, -(-len(records) // (8 * procs))))  # >= 8 tasks a process: even finish
            tasks = [records[i:i + size] for i in range(0, len(records), size)]
            with ProcessPoolExecutor(min(procs, len(tasks)), mp_context=_FORK,
                                     initializer=_init_worker, initargs=(enc,)) as pool:
                futures = [pool.submit(_work, t, str(build.reserve_part()), meta, job) for t in tasks]
                for future in as_completed(futures):
                    seconds, n, task_skips = future.result()
                    done_s, computed = done_s + seconds, computed + n
                    skipped.extend(task_skips)
                    advance(bar, seconds)
        else:
            for seconds, skip in encode_rows(enc, records, job, build.add):
                if skip:
                    skipped.append(skip)
                else:
                    computed += 1
                done_s += seconds
                advance(bar, seconds)
    return finish("extract", build, out=out, skips=skips, skipped=skipped, computed=computed,
                  audio_seconds=done_s)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m features.extract", description=__doc__.split("\n\n")[0])
    add_store_args(p)
    p.add_argument("--encoder", default=os.environ.get("SER_ENCODER") or DEFAULT_ENCODER,
                   help="hub id or local folder (default: $SER_ENCODER or %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--storage-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--layers", default="all", help="'all' or hidden-state indices, e.g. 0,6,12")
    p.add_argument("--max-seconds", type=lambda s: None if s in {"", "null", "None"} else float(s), default=None)
    p.add_argument("--offset-seconds", type=float, default=0.0)
    p.add_argument("--chunk-seconds", type=float, default=30.0, help="longer inputs are windowed")
    p.add_argument("--batch-seconds", type=float, default=60.0, help="most audio per equal-length batch")
    p.add_argument("--procs", type=int, default=None, help="encoder processes (default: one per core on CPU)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default 1 on CPU, 8 on CUDA)")
    p.add_argument("--part-entries", type=int, default=16, help="utterances per part file (kill-safety grain)")
    a = p.parse_args(argv)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    return extract(a.manifest, a.out, encoder=a.encoder, device=a.device, dtype=a.dtype, layers=a.layers,
                   max_seconds=a.max_seconds, offset_seconds=a.offset_seconds, storage_dtype=a.storage_dtype,
                   skips=a.skips, chunk_seconds=a.chunk_seconds, batch_seconds=a.batch_seconds, procs=a.procs, workers=a.workers, part_entries=a.part_entries)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as err:  # a clear message, not a traceback
        sys.exit(f"error: {err}")
