"""Stage ``egemaps``: openSMILE eGeMAPSv02 features of every manifest row into an HDF5 store.

Per utterance the store holds the 88 functionals (``fs.pooled(uid)`` -> ``[1, 88]``) and the 25 low-level
descriptors every 10 ms (``fs.frames(uid, 0)`` -> ``[T, 25]``). Audio is read as mono 16 kHz; files are
processed by a pool of processes, one per core. The store is built incrementally and kill-safely, append-only, by
:class:`features.cache.StoreBuild`, in the layout of :mod:`features.store`.

Example:
    python -m features.egemaps --manifest data/manifest.csv --out data/features/egemaps
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import sys
import warnings
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from features.cache import StoreBuild, add_store_args, advance, publish
from features.hardware import host
from pipeline.audio import SAMPLE_RATE, AudioError, load_audio
from pipeline.cli import positive_int, run_main
from pipeline.processes import worker_pool
from pipeline.roots import read_manifests


@functools.cache
def _smiles():
    import opensmile
    return tuple(opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02, feature_level=level)
                 for level in (opensmile.FeatureLevel.Functionals, opensmile.FeatureLevel.LowLevelDescriptors))


def feature_names() -> tuple[list[str], list[str]]:
    """``(functional_names [88], lld_names [25])`` of eGeMAPSv02."""
    functionals, llds = _smiles()
    return list(functionals.feature_names), list(llds.feature_names)


#: openSMILE turns float samples into 16-bit ones by truncation, so anything at or beyond full scale wraps around
#: (+1.0 becomes -1.0): samples are clipped to the 16-bit range first, as any 16-bit export clips them.
FULL_SCALE = (-1.0, 32767 / 32768)


def beyond_full_scale(wave: np.ndarray) -> int:
    """How many samples of ``wave`` :func:`egemaps_features` clips (float audio beyond 16-bit full scale, or
    resampling overshoot of near-full-scale audio)."""
    x = np.asarray(wave)
    return int(np.count_nonzero((x < FULL_SCALE[0]) | (x > FULL_SCALE[1])))


def egemaps_features(wave: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """eGeMAPSv02 of one waveform (samples beyond 16-bit full scale clipped: see :data:`FULL_SCALE`).

    Args:
        wave: ``[N]`` float mono samples.
        sample_rate: their rate in Hz (16 kHz is what the stage uses).

    Returns:
        ``(functionals [88], llds [T, 25])`` float32, ``T`` = one frame per 10 ms.

    Raises:
        AudioError: ``non_finite``: NaN or infinite samples.
        ValueError: a clip too short for openSMILE (it returns NaN), or features that are not finite.
    """
    functionals, llds = _smiles()
    x = np.asarray(wave, dtype=np.float32)
    if not np.isfinite(x).all():
        raise AudioError("non_finite", "expected finite audio samples, found NaN or infinite ones.")
    if beyond_full_scale(x):
        x = np.clip(x, *FULL_SCALE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Segment too short": turned into the error below
        f = functionals.process_signal(x, sample_rate).to_numpy(np.float32)[0]
        lld = llds.process_signal(x, sample_rate).to_numpy(np.float32)
    if not (np.isfinite(f).all() and np.isfinite(lld).all()):
        raise ValueError(f"eGeMAPS gave non-finite values for a {len(x) / sample_rate:.3f} s clip; expected a "
                         "clip long enough for openSMILE's 60 ms pitch window (at least ~0.1 s of signal).")
    return f, lld


def _work(path: str) -> tuple:
    """One file in a worker process: ``("ok", functionals, llds, seconds, clipped samples)`` or ``("skip", reason,
    detail)``; samples beyond full scale are clipped by :func:`egemaps_features` and counted here."""
    try:
        wave = load_audio(path, sample_rate=SAMPLE_RATE)
        f, lld = egemaps_features(wave, SAMPLE_RATE)
        return "ok", f, lld, len(wave) / SAMPLE_RATE, beyond_full_scale(wave)
    except AudioError as err:  # plain tuples: AudioError does not survive pickling between processes
        return "skip", err.reason, str(err)
    except ValueError as err:
        return "skip", "too_short", str(err)
    except OSError as err:
        return "skip", "missing", str(err)


def extract_egemaps(manifests: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                    skips: str | os.PathLike | None = None, workers: int | None = None,
                    part_entries: int = 256) -> dict:
    """Build or update the eGeMAPS store ``out`` for the rows of ``manifests``.

    Args:
        manifests: manifest CSVs (``id, path, ...``), concatenated.
        out: the store folder (a collection; reused entries kept, new rows computed, rows no longer listed left
            out of its view).
        skips: CSV of rows not stored (default ``<out>.skips.csv``).
        workers: processes (default: one per core).
        part_entries: utterances per shard (the most work a kill can lose).

    Returns:
        ``{"computed", "reused", "skipped", "stored", "removed", "corrupt", "audio_seconds"}``.
    """
    import opensmile

    rows = read_manifests(manifests, keep_default_na=False)
    functional_names, lld_names = feature_names()
    meta = {"kind": "egemaps", "encoder": "opensmile/eGeMAPSv02", "revision": f"opensmile {opensmile.__version__}",
            "sample_rate": SAMPLE_RATE, "layers": [0], "dtype": "float32", "storage_dtype": "float32",
            "max_seconds": None, "offset_seconds": 0.0, "frame_stride_s": 0.01,
            "functional_names": functional_names, "lld_names": lld_names,
            "input": "clipped to 16-bit full scale",  # entries from before the clip (wrapped samples) are not reused
            "versions": {"opensmile": opensmile.__version__, "numpy": np.__version__},
            "provenance": {"device": "cpu", **host(), "procs": workers or os.cpu_count()}}  # what computed it; not the store's identity
    build = StoreBuild(out, meta, part_entries=part_entries)
    todo, skipped = build.plan(rows)
    total = float(todo["duration_s"].astype(float).sum()) if "duration_s" in todo else None
    done_s, computed, beyond = 0.0, 0, []
    with worker_pool(workers or os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool, \
            tqdm(total=total, unit="s", unit_scale=True, desc="egemaps", disable=todo.empty) as bar:
        for row, result in zip(todo.itertuples(index=False), pool.map(_work, todo["path"], chunksize=4),
                               strict=True):
            if result[0] == "skip":
                skipped.append({"id": row.id, "path": row.path, "reason": result[1], "detail": result[2]})
                continue
            _, f, lld, seconds, clipped = result
            if clipped:
                beyond.append(f"{row.path} ({clipped} samples)")
            build.add(row.id, source=row.source, frames=lld[None], pooled=f[None], path=row.path,
                      duration_s=seconds)
            computed, done_s = computed + 1, done_s + seconds
            advance(bar, seconds)
    if beyond:
        print(f"warning: egemaps: {len(beyond)} files have samples beyond 16-bit full scale (float audio above 1.0, "
              f"or a resampler's overshoot of near-full-scale audio), clipped there because openSMILE reads 16-bit "
              f"audio (e.g. {beyond[0]}); their features describe the clipped signal. Lower the level at the source "
              "for features of the whole signal.", file=sys.stderr)
    return publish("egemaps", build, out=out, skips=skips, skipped=skipped, computed=computed,
                  audio_seconds=done_s)


@run_main
def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m features.egemaps", description=__doc__.split("\n\n")[0])
    add_store_args(p)
    p.add_argument("--workers", type=positive_int, default=None, help="processes (default: one per core)")
    a = p.parse_args(argv)
    return extract_egemaps(a.manifest, a.out, skips=a.skips, workers=a.workers)


if __name__ == "__main__":
    sys.exit(main())
