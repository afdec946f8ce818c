"""Stage ``extract``: frozen wav2vec2-family hidden states of every manifest row into an HDF5 store.

Each row's audio is decoded (mono, resampled with soxr to the encoder's rate, optionally cropped) in background
threads, normalised by the encoder's own feature extractor and run through the frozen encoder with all hidden
states. Only inputs of identical length share a batch (GroupNorm: padding would change every frame). The store
is built incrementally and kill-safely by :class:`features.cache.StoreBuild`; rows whose audio cannot be used
are listed in the skips report.

Example:
    python -m features.extract --manifest data/manifest.csv --manifest data/augmented/manifest.csv \\
        --out data/features/wav2vec2.h5 --skips data/features/wav2vec2.skips.csv --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from features.cache import StoreBuild, read_manifests, write_skips
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


def decoded(rows: pd.DataFrame, enc: Encoder, *, offset_s: float, max_s: float | None, workers: int,
            lookahead: int = 16) -> Iterator[tuple[object, np.ndarray | None, Exception | None]]:
    """Yield ``(row, normalised wave [N] or None, error or None)`` in row order, decoded ahead by threads."""
    with ThreadPoolExecutor(workers) as pool:
        it = rows.itertuples(index=False)
        queue = deque((r, pool.submit(_decode, r.path, enc, offset_s, max_s)) for r in islice(it, lookahead))
        while queue:
            row, future = queue.popleft()
            for nxt in islice(it, 1):
                queue.append((nxt, pool.submit(_decode, nxt.path, enc, offset_s, max_s)))
            try:
                yield row, future.result(), None
            except (AudioError, OSError) as err:
                yield row, None, err


def extract(manifests: Sequence[str | os.PathLike], out: str | os.PathLike, *, encoder: str | Encoder = DEFAULT_ENCODER,
            device: str = "auto", dtype: str = "float32", layers: str = "all", max_seconds: float | None = None,
            offset_seconds: float = 0.0, storage_dtype: str = "float16", skips: str | os.PathLike | None = None,
            chunk_seconds: float = 30.0, batch_seconds: float = 60.0, workers: int | None = None,
            part_entries: int = 32) -> dict:
    """Build or update the wav2vec2 feature store ``out`` for the rows of ``manifests``.

    Args:
        manifests: manifest CSVs (``id, path, ...``), concatenated.
        out: the ``.h5`` store; reused entries are kept, new rows computed, rows no longer listed dropped.
        encoder: hub id or local folder (or an already loaded :class:`~features.encoder.Encoder`, whose own
            device, dtype and window then apply).  device, dtype: see :func:`features.encoder.load_encoder`.
        layers: ``all`` or hidden-state indices ``0,6,12``.
        max_seconds, offset_seconds: crop each file to ``[offset, offset + max)`` seconds (None: to the end).
        storage_dtype: ``float16`` or ``float32`` for frames (pooled statistics are always float32).
        chunk_seconds: inputs longer than this (plus 2 x 2 s context) are windowed.
        skips: CSV of rows not stored (default ``<out>.skips.csv``).
        batch_seconds: most audio per batch of equal-length inputs.
        workers: decoding threads (default 1 on CPU, 8 on CUDA).
        part_entries: utterances per part file (the most work a kill can lose).

    Returns:
        ``{"computed", "reused", "skipped", "stored", "removed", "audio_seconds"}``.
    """
    rows = read_manifests(manifests)
    enc = encoder if isinstance(encoder, Encoder) else load_encoder(
        encoder, device=device, dtype=dtype, chunk_seconds=chunk_seconds)
    picked = parse_layers(layers, enc.num_layers)
    meta = {"kind": "wav2vec2", "encoder": enc.name, "revision": enc.revision, "sample_rate": enc.sample_rate,
            "layers": picked, "dtype": enc.dtype, "storage_dtype": storage_dtype, "max_seconds": max_seconds,
            "offset_seconds": offset_seconds, "chunk_seconds": enc.chunk_seconds,
            "overlap_seconds": enc.overlap_seconds, "frame_stride": enc.stride, "versions": versions()}
    build = StoreBuild(out, meta, part_entries=part_entries)
    todo, skipped = build.plan(rows)
    if build.rebuild_reason:
        print(f"extract: rebuilding {out}: {build.rebuild_reason}")
    if "duration_s" in todo:
        todo = todo.sort_values("duration_s", kind="stable")  # equal lengths become neighbours
        seconds = (pd.to_numeric(todo["duration_s"], errors="coerce").fillna(0) - offset_seconds).clip(lower=0)
        total = float(seconds.clip(upper=max_seconds).sum() if max_seconds else seconds.sum())
    else:
        total = None
    workers = workers or (8 if enc.device.type == "cuda" else 1)
    done_s, computed, batch = 0.0, 0, []

    def flush() -> None:
        if batch:
            states = enc.forward(np.stack([w for _, w in batch]), layers=picked)
            for (row, _), frames in zip(batch, states, strict=True):
                build.add(row.id, source=row.source, frames=frames, path=row.path,
                          duration_s=len(batch[0][1]) / enc.sample_rate)
            batch.clear()

    with tqdm(total=total, unit="s", unit_scale=True, desc="extract", disable=todo.empty) as bar:
        for row, wave, err in decoded(todo, enc, offset_s=offset_seconds, max_s=max_seconds, workers=workers):
            if err is not None:
                skipped.append({"id": row.id, "path": row.path, "reason": getattr(err, "reason", "missing"),
                                "detail": str(err)})
                continue
            if batch and (len(wave) != len(batch[0][1]) or (len(batch) + 1) * len(wave) > batch_seconds * enc.sample_rate):
                flush()
            if len(wave) <= enc.max_single_samples:
                batch.append((row, wave))
            else:  # long: windowed, streamed piece by piece into the store
                flush()
                build.add(row.id, source=row.source, pieces=enc.iter_hidden_states(wave, layers=picked, normalised=True),
                          num_frames=enc.num_frames(len(wave)), hidden_size=enc.hidden_size, path=row.path,
                          duration_s=len(wave) / enc.sample_rate)
            computed += 1
            done_s += len(wave) / enc.sample_rate
            bar.update(len(wave) / enc.sample_rate)
        flush()
    counts = build.finish()
    skips = write_skips(skips or f"{out}.skips.csv", skipped)
    summary = {"computed": computed, "reused": build.reused, "skipped": len(skipped), **counts, "audio_seconds": round(done_s, 2)}
    print(f"extract: {summary['computed']} computed ({done_s:.1f} s of audio), {summary['reused']} reused, "
          f"{summary['skipped']} skipped (see {skips}), {summary['removed']} removed; "
          f"{summary['stored']} utterances in {out}")
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m features.extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", action="append", required=True, help="manifest CSV (repeatable)")
    p.add_argument("--out", required=True, help="the HDF5 store to build or update")
    p.add_argument("--skips", help="CSV of rows not stored (default: <out>.skips.csv)")
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
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default 1 on CPU, 8 on CUDA)")
    p.add_argument("--part-entries", type=int, default=32, help="utterances per part file (kill-safety grain)")
    a = p.parse_args(argv)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    return extract(a.manifest, a.out, encoder=a.encoder, device=a.device, dtype=a.dtype, layers=a.layers,
                   max_seconds=a.max_seconds, offset_seconds=a.offset_seconds, storage_dtype=a.storage_dtype,
                   skips=a.skips, chunk_seconds=a.chunk_seconds, batch_seconds=a.batch_seconds, workers=a.workers, part_entries=a.part_entries)


if __name__ == "__main__":
    main()
