"""Benchmark: the overhead of ``--engine ray`` against the single-machine path, measured in one run.

A randomly initialised model of the wav2vec2-base architecture (the pretrained model's cost, no download) extracts
the same files (about ``--audio-seconds`` of audio, picked as :func:`features.bench.pick_files` picks), each time in
a fresh process, with the single-machine engine (``--cpus`` forked single-thread processes) and on a local Ray
cluster of ``--cpus`` CPUs (as many single-thread actors), in the order local, ray, ray, local (``--repeats 2``: a
drift of the machine's load over the run weighs on both engines alike). Each time is the
:func:`features.extract.extract` call, model loading and store writes included; the Ray cluster is started before
the clock (``ray_start_seconds``, reported apart: a cluster is started once and serves many extractions).
``overhead`` = Ray's total time / the local total time - 1, and ``equal`` says whether all the stores hold the same
numbers.

Example:
    python scripts/bench_ray.py --audio-seconds 300 --json ray-overhead.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from features.bench import DEFAULT_CORPUS, pick_files

SETTINGS = {"device": "cpu", "dtype": "float32", "feature_encoder": "library"}


def _timed(engine: str, model: str, manifest: str, out: str, cpus: int) -> dict:
    """One engine, in its own process: the extraction's wall time (and the Ray cluster's start-up apart)."""
    from features.extract import extract
    started = 0.0
    if engine == "ray":
        import ray
        start = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        started = time.perf_counter() - start
    load = os.getloadavg()[0]
    start = time.perf_counter()
    summary = extract([manifest], out, encoder=model, engine=engine, procs=cpus, **SETTINGS)
    wall = time.perf_counter() - start
    return {"wall_seconds": round(wall, 2), "audio_seconds": summary["audio_seconds"],
            "ray_start_seconds": round(started, 2) if engine == "ray" else None,
            "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)]}


def _equal(a: str, b: str) -> bool:
    from features.store import FeatureStore
    with FeatureStore(a) as x, FeatureStore(b) as y:
        return sorted(x.ids()) == sorted(y.ids()) and all(
            np.array_equal(x.all_frames(u), y.all_frames(u)) and np.array_equal(x.pooled(u), y.pooled(u))
            for u in x.ids())


def bench_ray(*, audio_seconds: float = 300.0, corpus: Path = DEFAULT_CORPUS, cpus: int = 2, repeats: int = 2) -> dict:
    """Extract the same audio with both engines; returns both times, the overhead and whether the stores agree."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    with tempfile.TemporaryDirectory(prefix="ser-bench-ray-") as tmp:
        rows = pick_files(manifest=None, corpus=corpus, audio_seconds=audio_seconds)
        rows.to_csv(f"{tmp}/manifest.csv", index=False)
        torch.manual_seed(0)
        Wav2Vec2Model(Wav2Vec2Config()).eval().save_pretrained(f"{tmp}/model")
        Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(f"{tmp}/model")
        runs: dict[str, list] = {"local": [], "ray": []}
        order = [("local", "ray") if i % 2 == 0 else ("ray", "local") for i in range(repeats)]
        for i, engine in enumerate(e for pair in order for e in pair):
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                runs[engine].append(pool.submit(_timed, engine, f"{tmp}/model", f"{tmp}/manifest.csv",
                                                f"{tmp}/{engine}{i}", cpus).result())
            print(json.dumps({"engine": engine, **runs[engine][-1]}), flush=True)
        total = {e: sum(r["wall_seconds"] for r in runs[e]) for e in runs}
        stores = [p for p in sorted(Path(tmp).glob("local*")) + sorted(Path(tmp).glob("ray*")) if p.is_dir()]
        record = {"files": len(rows), "audio_seconds": runs["local"][0]["audio_seconds"], "cpus": cpus,
                  "local": runs["local"], "ray": runs["ray"],
                  "overhead": round(total["ray"] / total["local"] - 1, 4),
                  "equal": all(_equal(str(stores[0]), str(s)) for s in stores[1:]),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    return record


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python scripts/bench_ray.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--audio-seconds", type=float, default=300.0)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="audio folder (default %(default)s)")
    p.add_argument("--cpus", type=int, default=2, help="local processes, and Ray CPUs (single-thread actors)")
    p.add_argument("--repeats", type=int, default=2, help="pairs of runs (local, ray), alternating the order")
    p.add_argument("--json", default=None, help="write the record here")
    a = p.parse_args(argv)
    record = bench_ray(audio_seconds=a.audio_seconds, corpus=a.corpus, cpus=a.cpus, repeats=a.repeats)
    print(json.dumps(record))
    if a.json:
        Path(a.json).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
