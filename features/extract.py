"""Stage ``extract``: frozen wav2vec2-family hidden states of every manifest row into an HDF5 store.

Each row's audio is decoded (mono, resampled with soxr to the encoder's rate, optionally cropped) in a
background thread, normalised by the encoder's own feature extractor and run through the frozen encoder with
all hidden states. Rows of nearly equal length share a forward pass, planned over all rows by
:func:`plan_batches` (each stays exact: see :meth:`features.encoder.Encoder.forward`); inputs longer than a window
are windowed (see :mod:`features.encoder`) and streamed into the store. On CPU the passes are shared by one
single-thread process per core (forked after the model is loaded); on CUDA one process feeds the GPU, with
several decoding threads. The store is built incrementally and kill-safely by
:class:`features.cache.StoreBuild`; rows whose audio cannot be used are listed in the skips report.

Example:
    python -m features.extract --manifest data/manifest.csv --manifest data/augmented/manifest.csv \\
        --out data/features/wav2vec2-base --skips data/features/wav2vec2-base.skips.csv \\
        --encoder facebook/wav2vec2-base --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from features.cache import (
    PartWriter,
    StoreBuild,
    add_store_args,
    advance,
    publish,
)
from features.distributed import Engine, RayActors, parse_shard, require_ray, shard_ids, shard_summary
from features.encoder import (
    DEFAULT_ENCODER,
    DTYPES,
    FEATURE_ENCODERS,
    Encoder,
    choose_feature_encoder,
    load_encoder,
    pick_dtype,
    plugin_version_note,
    resolve_device,
)
from features.hardware import Device, DType, device_arg, host
from features.store import FEATURE_ENCODER_CHOICE, FeatureStore, claim_json, read_choice
from pipeline.audio import AudioError, load_audio
from pipeline.cli import non_negative_float, positive_float, positive_int, run_main
from pipeline.processes import cpu_cores, worker_pool
from pipeline.roots import read_manifests


def versions() -> dict:
    """Library versions recorded in a store (informative; they do not invalidate it)."""
    import h5py
    import soxr
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
            "h5py": h5py.__version__, "soxr": soxr.__version__}


def machine(enc: Encoder) -> dict:
    """The machine that computes with ``enc``: host, CPU (and GPU) model, library versions."""
    record = {**host(), "versions": versions()}
    if enc.device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(enc.device)
    return record


def provenance(enc: Encoder, procs: int) -> dict:
    """What produced a run's entries (recorded with them; not part of the store's identity): the hardware, the
    feature-encoder implementation and how it was chosen, the process layout and the library versions."""
    return {"device": str(enc.device), **machine(enc), "procs": procs,
            "threads_per_proc": 1 if enc.device.type == "cpu" else torch.get_num_threads(),
            "feature_encoder": enc.feature_encoder, "feature_encoder_version": enc.feature_encoder_version,
            "frame_grid": enc.frame_grid, "feature_encoder_timing": enc.feature_encoder_timing,
            "attention": getattr(enc.model.config, "_attn_implementation", None)}


def recorded_feature_encoder(store_dir: Path) -> dict | None:
    """What an identity store is computed with: the choice its first timing recorded (:data:`FEATURE_ENCODER_CHOICE`)
    or, for a store from before that file, the provenance of its newest shard; with ``frame_grid`` filled in (1 for
    a store from before frame grids). None for a store with neither, or one whose implementation this version does
    not have."""
    record = None
    if (store_dir / FEATURE_ENCODER_CHOICE).is_file():
        with contextlib.suppress(ValueError):  # unreadable: timed again, and the claim says why
            record = read_choice(store_dir / FEATURE_ENCODER_CHOICE)
    elif any((store_dir / "shards").glob("*.h5")):
        with contextlib.suppress(OSError, ValueError), FeatureStore(store_dir) as fs:
            record = dict(fs.attrs.get("provenance") or {})
    if not record:
        return None
    record.setdefault("frame_grid", 1)
    grid = record["frame_grid"]
    return record if record.get("feature_encoder") in FEATURE_ENCODERS and isinstance(grid, int) and grid >= 1 \
        else None


def keep_store_choice(enc: Encoder, store_dir: Path) -> None:
    """Set ``enc``'s feature-encoder implementation and frame grid to what the identity store ``store_dir`` is
    computed with (:func:`recorded_feature_encoder`): a resumed or extended store is computed as it began, whatever
    today's timing says. A store without a choice is timed now (:func:`features.encoder.choose_feature_encoder`) and
    the choice recorded; where another run recorded one meanwhile (a ``--shard`` member starting at the same time),
    that one is followed."""
    earlier = recorded_feature_encoder(store_dir)
    if earlier is None:
        choose_feature_encoder(enc)
        mine = {"feature_encoder": enc.feature_encoder, "frame_grid": enc.frame_grid,
                "feature_encoder_version": enc.feature_encoder_version}
        earlier = claim_json(store_dir / FEATURE_ENCODER_CHOICE, mine)
        if earlier == mine:
            return
        kept_from = "another run's timing, recorded first (a --shard member starting at the same time)"
    else:
        kept_from = "the store's recorded choice"
    enc.use_feature_encoder(earlier["feature_encoder"])
    enc.use_frame_grid(earlier.get("frame_grid", 1))
    enc.feature_encoder_timing = {"chosen": enc.feature_encoder, "frame_grid": enc.frame_grid,
                                  "kept_from": kept_from}
    if note := plugin_version_note(earlier, enc):
        print(f"note: {note} Each shard records the version it was computed with.")


def auto_dtype(out: str | os.PathLike, device: torch.device) -> str:
    """The dtype ``auto`` means for the collection ``out`` on this device class: the one its first such run chose,
    recorded in ``<out>/dtype-auto-<device>.json`` (first writer wins, so ``--shard`` members starting together on
    several machines agree), else, for a collection from before that file, the one of its last run; otherwise timed
    now (:func:`features.encoder.pick_dtype`) and recorded. Reruns keep it whatever a new timing would say.

    Raises:
        ValueError: the recorded file does not name a dtype.
    """
    out = Path(out)
    record = out / f"dtype-auto-{device.type}.json"
    if out.exists() and not out.is_dir():  # refused with a clear message where the store is opened
        return pick_dtype(DType.AUTO, device)
    if record.is_file():
        held = read_choice(record).get("dtype")
    else:
        out.mkdir(parents=True, exist_ok=True)
        chosen = _last_auto_dtype(out, device.type) or pick_dtype(DType.AUTO, device)
        held = claim_json(record, {"dtype": chosen}).get("dtype")
    if held not in {DType.FLOAT32, DType.BFLOAT16, DType.FLOAT16}:
        raise ValueError(f"{record}: expected a dtype (float32, bfloat16 or float16), found {held!r}. Delete the file "
                         "to choose again.")
    return held


def _last_auto_dtype(out: Path, device_type: str) -> str | None:
    """The dtype ``auto`` chose for the collection ``out`` on this device class in its last run (None where there
    is no such run)."""
    if not (out / "current.json").is_file():
        return None
    try:
        with FeatureStore(out) as fs:
            attrs = fs.attrs
    except (OSError, ValueError):
        return None
    chosen = (attrs.get("provenance") or {}).get("dtype_requested") == "auto" and attrs.get("device") == device_type
    return attrs.get("dtype") if chosen else None


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """``"all"`` or ``"0,6,12"`` -> hidden-state indices, checked against ``num_layers``.

    Raises:
        ValueError: not ``all`` or integers, an index out of range, or one listed twice.
    """
    try:
        layers = list(range(num_layers)) if spec == "all" else [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        layers = []
    if not layers or any(not 0 <= i < num_layers for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"--layers {spec!r}: expected 'all' or distinct comma-separated indices in "
                         f"0..{num_layers - 1}; the encoder has {num_layers} hidden states.")
    return layers


def layers_arg(spec: str) -> str:
    """argparse type of ``--layers``: its form checked before any work (the range once the encoder is loaded)."""
    try:
        if spec != "all":
            parse_layers(spec, sys.maxsize)  # the form: integers, none negative, none twice
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or distinct comma-separated hidden-state indices "
                                         f"(e.g. 0,6,12), found {spec!r}") from None
    return spec


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
    max_batch: int = 4
    max_padding: float = 0.1
    tail_alone: int = 0
    storage_dtype: str = "float16"


def decoded(rows: Sequence[dict], enc: Encoder, job: Job
            ) -> Iterator[tuple[dict, np.ndarray | None, Exception | None]]:
    """Yield ``(row, normalised wave [N] or None, error or None)`` in row order, decoded ahead by threads.

    Decoding runs up to two passes ahead of the row last yielded: ``2 * job.max_batch`` rows (at least 16) and
    ``2 * job.batch_seconds`` of audio (the rows' ``seconds``; an unknown length counts as the whole budget),
    so that a pass finds its audio decoded, while long files are held one ahead, not sixteen (an hour of
    audio is 230 MB decoded)."""
    most_rows, most_seconds = max(16, 2 * job.max_batch), 2 * job.batch_seconds

    def held(row: dict) -> float:
        return row["seconds"] if np.isfinite(row["seconds"]) else most_seconds

    with ThreadPoolExecutor(job.decode_workers) as pool:
        waiting, queue = deque(rows), deque()

        def fill() -> None:  # the next row always: the one after the row being yielded decodes meanwhile
            while waiting and (not queue or (len(queue) < most_rows
                                             and sum(held(r) for r, _ in queue) < most_seconds)):
                row = waiting.popleft()
                queue.append((row, pool.submit(_decode, row["path"], enc, job.offset_s, job.max_s)))

        fill()
        while queue:
            row, future = queue.popleft()
            fill()
            try:
                yield row, future.result(), None
            except (AudioError, OSError) as err:
                yield row, None, err


def cropped_seconds(rows: pd.DataFrame, job: Job) -> pd.Series:
    """Each row's manifest ``duration_s`` after the crop (NaN where unknown)."""
    seconds = pd.to_numeric(rows.get("duration_s", pd.Series(np.nan, index=rows.index)), errors="coerce")
    seconds = (seconds - job.offset_s).clip(lower=0)
    return seconds.clip(upper=job.max_s) if job.max_s else seconds


def plan_batches(rows: pd.DataFrame, todo: set[str], job: Job, enc: Encoder) -> list[list[dict]]:
    """Group every wanted row, not only those still to do, into forward passes; keep the passes with work.

    Rows are sorted longest first (manifest ``duration_s`` after the crop); a pass holds up to
    ``job.max_batch`` neighbours within ``job.max_padding`` of its longest and ``job.batch_seconds`` of padded
    audio; inputs long enough to be windowed, or without a duration, run alone, and so do the
    ``job.tail_alone`` shortest rows: they are computed last, and single passes let the processes finish
    within a short utterance of each other. Because passes are planned
    over all rows and a part file only ever holds whole passes, a resumed run makes exactly the passes an
    uninterrupted one makes (results are bitwise reproducible even where a library's arithmetic depends on
    the batch). A pass is computed whole; only its rows in ``todo`` are stored.

    Returns:
        Passes of row dicts ``id, path, source, seconds, todo``.
    """
    rows = rows.assign(_seconds=cropped_seconds(rows, job)).sort_values("_seconds", kind="stable", ascending=False, na_position="last")
    longest_single = enc.max_single_samples / enc.sample_rate
    batches: list[list[dict]] = []
    open_longest = None  # the longest input of the last pass, None when that pass takes no more
    first_tail = len(rows) - job.tail_alone
    for index, row in enumerate(rows[["id", "path", "source", "_seconds"]].to_dict("records")):
        length = row["seconds"] = row.pop("_seconds")
        row["todo"] = row["id"] in todo
        alone = not np.isfinite(length) or length > longest_single or index >= first_tail
        if (not alone and open_longest is not None and len(batches[-1]) < job.max_batch
                and (len(batches[-1]) + 1) * open_longest <= job.batch_seconds
                and length >= (1 - job.max_padding) * open_longest):
            batches[-1].append(row)
        else:
            batches.append([row])
            open_longest = None if alone else length
    return [b for b in batches if any(r["todo"] for r in b)]


def to_host(x: torch.Tensor) -> torch.Tensor:
    """Start an asynchronous copy of a device tensor into page-locked host memory (CPU tensors pass through);
    the copy is complete once the device's stream is synchronised."""
    if x.device.type == "cpu":
        return x
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return out.copy_(x, non_blocking=True)


def cast_and_pool(states: torch.Tensor, storage_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """On the states' device: frames cast to the storage dtype, and per-layer mean ‖ std (ddof=0) over time
    computed in float32 from the unrounded states. ``[L, T, H]`` -> ``([L, T, H], [L, 2H])``.

    Two passes (the mean, then the mean squared deviation, in place on a float32 copy) rather than
    ``torch.std_mean``, whose reduction over the middle dimension is several times slower on CPU
    (docs/benchmarks.md); the two-pass form is the numerically careful one as well."""
    frames = states.to(storage_dtype)
    x = states.to(torch.float32, copy=True)  # a copy of its own: pooled in place below
    mean = x.mean(dim=1)
    std = x.sub_(mean[:, None]).square_().mean(dim=1).sqrt_()
    return frames, torch.cat([mean, std], dim=-1)


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says the device ran out of memory: torch's own error, or cuBLAS's and cuDNN's allocation
    failures, which reach Python as a plain ``RuntimeError``."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and any(text in str(err) for text in ("out of memory", "ALLOC_FAILED")))


def forward_split(enc: Encoder, waves: list[np.ndarray], layers: Sequence[int]) -> list[torch.Tensor]:
    """:meth:`Encoder.forward`; a pass that runs out of device memory is split in halves and retried, down to
    single rows (each row's result does not depend on its batch-mates)."""
    try:
        return enc.forward(waves, layers=layers)
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not out_of_memory(err):
            raise
        if len(waves) == 1:
            raise OSError(errno.ENOMEM, f"one utterance of {len(waves[0]) / enc.sample_rate:.1f} s does not fit in "
                              f"{enc.device} memory ({err}); expected windows that fit: pass a smaller "
                              "--chunk-seconds.") from err
    # retried outside the handler: the error's traceback holds the failed pass's tensors until the handler ends
    if enc.device.type == "cuda":
        torch.cuda.empty_cache()
    half = len(waves) // 2
    return forward_split(enc, waves[:half], layers) + forward_split(enc, waves[half:], layers)


def _groups(ready: list, enc: Encoder) -> list[list]:
    """The decoded rows of a pass that may share one forward: all of them, or (for an architecture that cannot
    mix frame counts) those of equal frame count."""
    if enc.architecture.mixed_lengths:
        return [ready] if ready else []
    by_frames: dict[int, list] = {}
    for item in ready:
        by_frames.setdefault(enc.num_frames(len(item[1])), []).append(item)
    return list(by_frames.values())


def encode_rows(enc: Encoder, batches: Sequence[Sequence[dict]], job: Job, add: Callable[..., None],
                end_batch: Callable[[], None] = lambda: None, *,
                pipelined: bool | None = None) -> Iterator[tuple[float, dict | None]]:
    """Encode passes of rows (``id, path, source, seconds, todo``, from :func:`plan_batches`); long inputs are
    windowed and streamed. :meth:`Encoder.forward` keeps every row of a pass exact.

    Each result of a ``todo`` row goes to ``add(uid, source=..., frames=..., pooled=... | pieces=..., ...)``
    (frames already in the storage dtype, cast and pooled on the device), then ``end_batch()`` runs after each
    pass. Yields, per ``todo`` row, ``(seconds of audio encoded, skip record or None)``.

    ``pipelined`` (default: on CUDA): a pass's results are collected only after the next pass has been queued,
    so that the device computes pass k + 1 while its copies of pass k reach the host and are handed to ``add``;
    the same rows, results and order of ``add`` calls as without.
    """
    storage = DTYPES[job.storage_dtype]
    pipelined = enc.device.type == "cuda" if pipelined is None else pipelined
    flat = [row for batch in batches for row in batch]
    waves = decoded(flat, enc, job)
    pending = None
    for batch in batches:
        ready = []
        for row, wave, err in islice(waves, len(batch)):
            if err is None:
                ready.append((row, wave))
            elif row["todo"]:
                yield 0.0, {"id": row["id"], "path": row["path"], "reason": getattr(err, "reason", "missing"),
                            "detail": str(err)}
        short = [(row, wave) for row, wave in ready if len(wave) <= enc.max_single_samples]
        results = {}
        try:
            for group in _groups(short, enc):
                if not any(row["todo"] for row, _ in group):  # its rows to do failed to decode: nothing to store
                    continue
                states = forward_split(enc, [w for _, w in group], job.layers)
                for (row, _), s in zip(group, states, strict=True):
                    if row["todo"]:
                        frames, pooled = cast_and_pool(s, storage)
                        results[row["id"]] = (to_host(frames), to_host(pooled))
                del states
        except BaseException:
            if pending is not None:  # the pass before this failing one is finished: stored, not lost
                yield from _collect(enc, job, add, end_batch, *pending)
            raise
        done = torch.cuda.Event() if enc.device.type == "cuda" else None
        if done is not None:
            done.record(torch.cuda.current_stream(enc.device))
        if pending is not None:
            yield from _collect(enc, job, add, end_batch, *pending)
        pending = (ready, results, done)
        if not pipelined:
            yield from _collect(enc, job, add, end_batch, *pending)
            pending = None
    if pending is not None:
        yield from _collect(enc, job, add, end_batch, *pending)


def _collect(enc: Encoder, job: Job, add: Callable[..., None], end_batch: Callable[[], None], ready: list,
             results: dict, done) -> Iterator[tuple[float, dict | None]]:
    """Hand one pass's results to ``add`` once its copies to the host are complete (``done``: the device event
    recorded after them), and compute its long rows window by window; then ``end_batch()``."""
    if done is not None:
        done.synchronize()
    for row, wave in ready:
        if not row["todo"]:
            continue
        meta = {"path": row["path"], "duration_s": len(wave) / enc.sample_rate}
        if row["id"] in results:
            frames, pooled = results.pop(row["id"])
            add(row["id"], source=row["source"], frames=frames.numpy(), pooled=pooled.numpy(), **meta)
        else:  # long: windowed, streamed piece by piece into the store
            pieces = (p.float().cpu().numpy() for p in enc.iter_hidden_states(wave, layers=job.layers,
                                                                              normalised=True))
            add(row["id"], source=row["source"], num_frames=enc.num_frames(len(wave)), pieces=pieces,
                hidden_size=enc.hidden_size, **meta)
        yield len(wave) / enc.sample_rate, None
    end_batch()


def split_tasks(batches: list[list], procs: int, most: int) -> list[list[list]]:
    """Cut the passes into tasks for ``procs`` processes, shrinking as the work runs out (guided scheduling):
    each task holds about half a process's share of the utterances left (at most ``most``, at least one
    pass). Rows come longest first, so the processes finish within about one short pass of each other."""
    tasks, start, left = [], 0, sum(len(b) for b in batches)
    while start < len(batches):
        target = max(1, min(most, -(-left // (2 * procs))))
        task, size = [], 0
        while start < len(batches) and (not task or size + len(batches[start]) <= target):
            task.append(batches[start])
            size, start = size + len(batches[start]), start + 1
        tasks.append(task)
        left -= size
    return tasks


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Encode on one thread here, as every worker process does: results then never depend on the thread
    count (a store resumed on another machine, or with other ``--procs``, equals an uninterrupted one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BackgroundWriter:
    """Runs store writes in order on one thread, so the device computes the next pass meanwhile; at most
    ``pending`` writes wait (bounded memory). An error in a write is raised by the next :meth:`submit` or by
    :meth:`close`."""

    def __init__(self, pending: int = 256):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._futures: deque = deque()
        self._pending = pending

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        while self._futures and (self._futures[0].done() or len(self._futures) >= self._pending):
            self._futures.popleft().result()
        self._futures.append(self._pool.submit(fn, *args, **kwargs))

    def wait(self) -> None:
        """Until every submitted write is done (raising the first error)."""
        while self._futures:
            self._futures.popleft().result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


_WORKER: dict = {}
_FORK = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _init_worker(enc: Encoder) -> None:
    """Worker process (forked, so the model is shared copy-on-write; dies with its parent): one thread."""
    torch.set_num_threads(1)
    _WORKER["enc"] = enc
    _WORKER["machine"] = machine(enc)  # once per worker: recorded in each of its shards


def _work(batches: list[list[dict]], part: str, meta: dict, job: Job) -> tuple[float, int, list[dict], Path | None]:
    """One task in a worker: encode whole passes into one part file; returns (seconds, computed, skips, the
    published part or None). The shard records the machine that computed it (a Ray actor's, not the driver's)."""
    enc, here = _WORKER["enc"], _WORKER["machine"]
    meta = {**meta, "versions": here["versions"], "provenance": {**meta.get("provenance", {}), **here}}
    writer = PartWriter(part, meta)
    try:
        results = list(encode_rows(enc, batches, job, writer.add))
    except BaseException:
        writer.discard()
        raise
    written = writer.close()
    return sum(s for s, _ in results), sum(k is None for _, k in results), [k for _, k in results if k], written


def extract(manifests: Sequence[str | os.PathLike], out: str | os.PathLike, *, encoder: str | Encoder = DEFAULT_ENCODER,
            device: str = "auto", dtype: str = "auto", layers: str = "all", max_seconds: float | None = None,
            offset_seconds: float = 0.0, storage_dtype: str = "float16", skips: str | os.PathLike | None = None,
            chunk_seconds: float = 30.0, batch_seconds: float = 60.0, procs: int | None = None,
            workers: int | None = None, part_entries: int = 16, max_batch: int | None = None,
            tail_alone: int | None = None, feature_encoder: str = "auto", engine: str = "local",
            address: str | None = None, shard: tuple[int, int] | None = None) -> dict:
    """Build or update the feature store ``out`` for the rows of ``manifests``.

    On CPU, ``procs`` forked processes of one thread each share the rows (no per-op synchronisation, and results
    that do not depend on the thread count); on CUDA one process feeds the GPU, with ``workers`` decoding
    threads and the store written by a background thread.

    Args:
        manifests: manifest CSVs (``id, path, ...``), concatenated.
        out: the store (see :mod:`features.store`); entries already computed with the same settings are reused.
        encoder: hub id or local folder (or an already loaded :class:`~features.encoder.Encoder`, whose own
            device, dtype and window then apply).  device, dtype, feature_encoder: see
            :func:`features.encoder.load_encoder`.
        layers: ``all`` or hidden-state indices ``0,6,12``.
        max_seconds, offset_seconds: crop each file to ``[offset, offset + max)`` seconds (None: to the end).
        storage_dtype: ``float16`` or ``float32`` for frames (pooled statistics are always float32).
        skips: CSV of rows not stored (default ``<out>.skips.csv``).
        chunk_seconds: inputs longer than this (plus 2 x 2 s context) are windowed.
        batch_seconds: most audio (padded) per forward pass.
        procs: single-thread encoder processes on CPU (default: one per core); 1 on CUDA.
        workers: decoding threads per process (default 1 on CPU, 8 on CUDA).
        part_entries: utterances per shard (the most work a kill can lose).
        max_batch: most utterances per forward pass (default 4 on CPU, 64 on CUDA).
        tail_alone: the shortest rows that run in single passes, computed last so that the processes end
            together (default 16 on CPU, 0 on CUDA).
        engine: ``local`` (this machine) or ``ray`` (actors of the Ray cluster at ``address``, one per GPU or
            CPU core: see :mod:`features.distributed`).
        shard: ``(K, N)``: compute only the K-th of N deterministic shards of the rows and publish their shards
            without index or view (a later call without ``shard`` writes them).

    Returns:
        The summary of :func:`features.cache.publish` (``computed``, ``reused``, ``skipped``, ``stored``, ...),
        plus ``compute_seconds``: the wall time from the first pass handed out to the last shard received (what
        start-up, planning and publishing cost is the rest of the call).
    """
    if storage_dtype not in {DType.FLOAT16, DType.FLOAT32}:
        raise ValueError(f"storage dtype {storage_dtype!r}: expected float16 or float32.")
    if engine not in list(Engine):
        raise ValueError(f"engine {engine!r}: expected one of {', '.join(Engine)}.")
    if engine == Engine.RAY:
        require_ray()
    rows = read_manifests(manifests, keep_default_na=False)
    timed = not isinstance(encoder, Encoder) and feature_encoder == "auto"  # timed below, only if there is work
    requested = dtype
    if dtype == DType.AUTO and not isinstance(encoder, Encoder):
        dtype = auto_dtype(out, resolve_device(device))
    actors = None
    if engine == Engine.RAY and not isinstance(encoder, Encoder):  # started first: they load while this process does
        dev = resolve_device(device)
        dtype = pick_dtype(dtype, dev)  # resolved once, for the actors and this process alike
        actors = RayActors(address, load={"name_or_dir": str(encoder), "device": dev.type, "dtype": dtype,
                                          "chunk_seconds": chunk_seconds},
                           gpu=dev.type == "cuda", init=_init_worker, work=_work)
    try:
        enc = encoder if isinstance(encoder, Encoder) else load_encoder(
            encoder, device=device, dtype=dtype, chunk_seconds=chunk_seconds,
            feature_encoder="library" if timed else feature_encoder)
        cuda = enc.device.type == "cuda"
        job = Job(parse_layers(layers, enc.num_layers), offset_seconds, max_seconds, batch_seconds,
                  workers or (8 if cuda else 1), max_batch or (64 if cuda else 4),
                  tail_alone=(0 if cuda else 16) if tail_alone is None else tail_alone, storage_dtype=storage_dtype)
        procs = 1 if cuda else (procs or cpu_cores())
        meta = {"kind": "wav2vec2", "encoder": enc.name, "revision": enc.revision,
                "model_type": enc.architecture.model_type, "sample_rate": enc.sample_rate,
                "layers": job.layers, "dtype": enc.dtype, "storage_dtype": storage_dtype, "device": enc.device.type,
                "max_seconds": max_seconds, "offset_seconds": offset_seconds, "chunk_seconds": enc.chunk_seconds,
                "overlap_seconds": enc.overlap_seconds, "frame_stride": enc.stride,
                **({"pass_plan": enc.architecture.pass_plan} if enc.architecture.pass_plan else {}),
                "versions": versions()}
        build = StoreBuild(out, meta, part_entries=part_entries)
        todo, skipped = build.plan(rows, clean=shard is None)
        if shard is not None:  # dealt over every manifest row, readable here or not, so that every member agrees
            dealt = plan_batches(rows.assign(source=None), set(rows["id"]), job, enc)
            todo = todo[todo["id"].isin(shard_ids(dealt, shard))]
        batches = plan_batches(build.wanted_rows, set(todo["id"]), job, enc)
        check_free_space(out, cropped_seconds(todo, job).fillna(0).sum(), enc, job)
        if engine == Engine.RAY and batches and actors is None:
            actors = RayActors.like(address, enc, init=_init_worker, work=_work)
        if actors is not None and not batches:  # started early, and nothing to compute
            actors.close()
            actors = None
        elif actors is not None:
            actors.keep(len(batches))
        if batches and timed:
            keep_store_choice(enc, build.store_dir)
        procs = actors.size if actors else procs
        meta["provenance"] = build.meta["provenance"] = {**provenance(enc, procs), "engine": engine,
                                                         "dtype_requested": requested}
        total = float(cropped_seconds(todo, job).fillna(0).sum()) if "duration_s" in todo else None
        done_s, computed = 0.0, 0
        computing = time.perf_counter()
        with tqdm(total=total, unit="s", unit_scale=True, desc="extract", disable=not batches) as bar, \
                _disk_full_explained(out):
            if actors:
                tasks = split_tasks(batches, procs, part_entries)
                parts = [str(build.reserve_part()) for _ in tasks]
                for seconds, n, task_skips, written in actors.run(tasks, parts, meta, job, enc=enc):
                    if written is not None:
                        build.absorb(written)
                    done_s, computed = done_s + seconds, computed + n
                    skipped.extend(task_skips)
                    advance(bar, seconds)
            elif procs > 1 and sum(map(len, batches)) > 1:
                tasks = split_tasks(batches, procs, part_entries)
                with worker_pool(min(procs, len(tasks)), mp_context=_FORK, initializer=_init_worker,
                                 initargs=(enc,)) as pool:
                    futures = [pool.submit(_work, t, str(build.reserve_part()), meta, job) for t in tasks]
                    for future in as_completed(futures):
                        try:
                            seconds, n, task_skips, written = future.result()
                        except BrokenProcessPool as err:
                            raise OSError(f"an encoder process died ({err}); {disk_note(out)}Finished shards are kept: "
                                          "rerun to resume once the cause (memory, disk, a signal) is gone.") from err
                        if written is not None:
                            build.absorb(written)
                        done_s, computed = done_s + seconds, computed + n
                        skipped.extend(task_skips)
                        advance(bar, seconds)
            else:
                writer = BackgroundWriter()

                def add(uid: str, **kw) -> None:  # shards roll between passes, not within one
                    if "pieces" in kw:  # a long row's windows are computed while it is written: on this thread,
                        writer.wait()   # after the writes queued before it (the encoder runs one pass at a time)
                        build.add(uid, roll=False, **kw)
                    else:
                        writer.submit(build.add, uid, roll=False, **kw)

                try:
                    with contextlib.nullcontext() if cuda else single_thread():
                        for seconds, skip in encode_rows(enc, batches, job, add,
                                                         end_batch=lambda: writer.submit(build.roll)):
                            if skip:
                                skipped.append(skip)
                            else:
                                computed += 1
                            done_s += seconds
                            advance(bar, seconds)
                except BaseException:
                    with contextlib.suppress(Exception):
                        writer.close()
                    build.discard()
                    raise
                writer.close()
        computing = time.perf_counter() - computing
        if shard is not None:
            summary = shard_summary(build, shard=shard, skipped=skipped, computed=computed, audio_seconds=done_s)
        else:
            summary = publish("extract", build, out=out, skips=skips, skipped=skipped, computed=computed,
                              audio_seconds=done_s)
        return {**summary, "compute_seconds": round(computing, 3)}
    finally:  # actors never outlive the call (closing twice is harmless)
        if actors is not None:
            actors.close()


def check_free_space(out: str | os.PathLike, seconds: float, enc: Encoder, job: Job) -> None:
    """Refuse to start when the disk under ``out`` cannot hold ``seconds`` of audio's frames.

    Raises:
        OSError: ``ENOSPC``, with the estimate and what to do.
    """
    need = seconds * enc.sample_rate / enc.stride * len(job.layers) * enc.hidden_size \
        * np.dtype(job.storage_dtype).itemsize
    free = shutil.disk_usage(nearest_existing(Path(out))).free
    if need > free:
        raise OSError(errno.ENOSPC, f"expected about {_size(need)} free for {seconds:.0f} s of audio "
                      f"({len(job.layers)} layers x {enc.hidden_size} in {job.storage_dtype}), found "
                      f"{_size(free)} free under {out}. Free space, choose another --out, store fewer "
                      "--layers, or use --storage-dtype float16.")


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@contextlib.contextmanager
def _disk_full_explained(out: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk met while writing shards into an error that says what is kept and what to do."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise OSError(errno.ENOSPC, f"the disk under {out} is full ({err}). Every finished shard is kept and "
                      "the previous view is unchanged: free space (or choose another --out) and rerun to "
                      "resume.") from err


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest existing parent."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_note(out: str | os.PathLike) -> str:
    """A hint when the disk under ``out`` is (nearly) full, else empty."""
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(nearest_existing(Path(out)))
        if usage.free < 0.01 * usage.total + (64 << 20):
            return f"the disk under {out} is full ({_size(usage.free)} free). "
    return ""


def _seconds_or_none(text: str) -> float | None:
    """``--max-seconds``: positive seconds, or empty / ``null`` / ``None`` for whole files (params.yaml's null)."""
    return None if text in {"", "null", "None"} else positive_float(text)


@run_main
def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m features.extract", description=__doc__.split("\n\n")[0])
    add_store_args(p)
    p.add_argument("--encoder", default=os.environ.get("SER_ENCODER") or DEFAULT_ENCODER,
                   help="hub id or local folder (default: $SER_ENCODER or %(default)s)")
    p.add_argument("--device", default=Device.AUTO, type=device_arg, metavar="{auto,cpu,cuda,cuda:N}")
    p.add_argument("--dtype", default=DType.AUTO, choices=list(DType),
                   help="compute dtype; auto: bfloat16 where this CPU or GPU runs it fast, else float32")
    p.add_argument("--storage-dtype", default=DType.FLOAT16, choices=[DType.FLOAT16, DType.FLOAT32])
    p.add_argument("--layers", default="all", type=layers_arg, help="'all' or hidden-state indices, e.g. 0,6,12")
    p.add_argument("--max-seconds", type=_seconds_or_none, default=None)
    p.add_argument("--offset-seconds", type=non_negative_float, default=0.0)
    p.add_argument("--chunk-seconds", type=positive_float, default=30.0, help="longer inputs are windowed")
    p.add_argument("--batch-seconds", type=positive_float, default=60.0, help="most audio (padded) per forward pass")
    p.add_argument("--procs", type=positive_int, default=None,
                   help="single-thread encoder processes on CPU (default: one per core)")
    p.add_argument("--workers", type=positive_int, default=None, help="decoding threads (default 1 on CPU, 8 on CUDA)")
    p.add_argument("--part-entries", type=positive_int, default=16, help="utterances per shard (kill-safety grain)")
    p.add_argument("--max-batch", type=positive_int, default=None,
                   help="most utterances per forward pass (default 4 on CPU, 64 on CUDA)")
    p.add_argument("--feature-encoder", default="auto", choices=["auto", *FEATURE_ENCODERS],
                   help="auto: the library's modules unless a plug-in is >= 10%% faster here (timed at start-up)")
    p.add_argument("--engine", default=Engine.LOCAL, choices=list(Engine),
                   help="local: this machine; ray: the actors of a Ray cluster (pip install -e '.[ray]')")
    p.add_argument("--address", default=None,
                   help="--engine ray: the cluster (auto, or HOST:PORT; default: start a local one)")
    p.add_argument("--shard", type=parse_shard, default=None, metavar="K/N",
                   help="compute only the K-th of N deterministic shards (e.g. a SLURM array); a final call "
                        "without --shard indexes them and writes the view")
    a = p.parse_args(argv)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    return extract(a.manifest, a.out, encoder=a.encoder, device=a.device, dtype=a.dtype, layers=a.layers,
                   max_seconds=a.max_seconds, offset_seconds=a.offset_seconds, storage_dtype=a.storage_dtype,
                   skips=a.skips, chunk_seconds=a.chunk_seconds, batch_seconds=a.batch_seconds, procs=a.procs,
                   workers=a.workers, part_entries=a.part_entries, max_batch=a.max_batch,
                   feature_encoder=a.feature_encoder, engine=a.engine, address=a.address, shard=a.shard)


if __name__ == "__main__":
    sys.exit(main())
