"""Benchmark: extraction speed per dtype against the machine's dense-matmul ceiling and against the way peers
extract, measured in the same run over the same audio.

A randomly initialised model of the wav2vec2-base architecture (``Wav2Vec2Config()``: the pretrained model's cost,
no download) is saved, then per dtype, each in a fresh process (own peak memory, no cross-talk):

1. **this tool**: :func:`features.extract.extract` over the files exactly as the stage runs (model load and the
   feature-encoder timing at start-up, decoding, normalisation, store writes included): ``wall_seconds``,
   ``throughput`` (seconds of audio per second), ``peak_rss_mb`` (whole process tree, proportional set size).
2. **the reference**, as EmoBox and s3prl extract: ``transformers.AutoModel`` loaded and cast to the dtype, then
   per file: decode, the model's feature extractor, one forward with ``output_hidden_states=True``, the states to
   numpy; torch's default threads. ``reference_throughput`` and ``vs_reference`` = throughput / that. It runs in
   a fresh process of its own, timed from the same point as this tool (after ``import torch``, so importing
   transformers and loading the model are inside both clocks): run after this tool in the same process, it would
   find transformers imported and skip ~2 s of start-up that this tool paid.
3. the machine's dense product rate in this dtype (``matmul_gflops``: the best of one process on every core and
   one single-thread process per core at once, torch's own product), and ``ceiling_ratio`` = throughput /
   (that rate / the encoder's FLOPs per second of audio, counted from its convolutions, linear layers and
   attention for these files).

The computing phase alone (from the first pass handed out to the last shard received; what a run spends before
and after it, the model load, the feature-encoder timing, planning and publishing, is ``startup_seconds``) gives
``compute_throughput``, ``compute_ceiling_ratio`` and ``compute_vs_reference``: the most the whole-run figures could
reach with a free start-up (the reference keeps its own start-up in its clock).

``cosine_vs_float32`` is the mean cosine similarity of the pooled features ``[L, 2H]`` with the float32 run's.
On CUDA, ``gpu_utilisation`` is the mean of ``torch.cuda.utilization()`` sampled during the extraction (None
where NVML is absent), and ``peak_gpu_mb`` the most device memory torch allocated.

Example:
    python -m features.bench --json bench.json                 # 1200 s of RAVDESS, float32 and bfloat16
    python -m features.bench --device cuda --audio-seconds 5400
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from features.hardware import Device, device_arg
from pipeline.cli import positive_float, positive_int
from pipeline.processes import worker_pool

DEFAULT_CORPUS = Path("../shared/corpora/ravdess")


def encoder_flops(config, num_samples: int) -> float:
    """FLOPs (2 per multiply-add) of one forward pass over ``num_samples`` samples: convs, linears, attention."""
    n, c_in, flops = num_samples, 1, 0.0
    for dim, kernel, stride in zip(config.conv_dim, config.conv_kernel, config.conv_stride, strict=True):
        n = (n - kernel) // stride + 1
        flops += 2.0 * n * c_in * dim * kernel
        c_in = dim
    h, t = config.hidden_size, n
    flops += 2.0 * t * c_in * h                                                          # feature projection
    flops += 2.0 * t * h * (h // config.num_conv_pos_embedding_groups) * config.num_conv_pos_embeddings
    per_layer = 2.0 * t * (4 * h * h + 2 * h * config.intermediate_size) + 4.0 * t * t * h  # proj, FFN, QK^T, AV
    return flops + config.num_hidden_layers * per_layer


def pick_files(*, manifest: str | None, corpus: Path, audio_seconds: float) -> pd.DataFrame:
    """About ``audio_seconds`` of audio, spread evenly over the sorted files (deterministic)."""
    if manifest:
        rows = pd.read_csv(manifest)[["id", "path", "duration_s"]]
    else:
        paths = sorted(p for p in corpus.rglob("*") if p.suffix.lower() in {".wav", ".flac"})
        if not paths:
            raise FileNotFoundError(f"{corpus}: expected audio files (.wav/.flac), found none; pass --manifest "
                                    "or --corpus.")
        rows = pd.DataFrame({"path": [str(p.resolve()) for p in paths],
                             "id": [str(p.relative_to(corpus).with_suffix("")) for p in paths]})
        rows["duration_s"] = [sf.info(p).duration for p in rows["path"]]
    mean = rows["duration_s"].mean()
    step = max(1, int(len(rows) * mean / audio_seconds))
    picked = rows.iloc[::step]
    return picked[picked["duration_s"].cumsum() <= audio_seconds + mean]


def _tree_memory_mb(pid: int, *, cheap: bool = False) -> float:
    """Memory of a process and its descendants, MiB: proportional set size (shared pages split between
    sharers), or with ``cheap`` the resident size (shared pages count per sharer; far cheaper to read)."""
    name, field = ("status", "VmRSS:") if cheap else ("smaps_rollup", "Pss:")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/{name}").read_text().splitlines():
                if line.startswith(field):
                    total += int(line.split()[1]) / 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # gone meanwhile, or no /proc (then only ru_maxrss is reported)
            continue
    return total


class _PeakMemory(threading.Thread):
    """Peak :func:`_tree_memory_mb` of this process tree, at little cost to the run it measures.

    Reading proportional set sizes makes the kernel walk every page, too slow to do at every new high without
    slowing the extraction it measures. So the resident size (a cheap read) is polled every
    ``period`` seconds, the proportional size is read only when the resident size has grown by ``step`` since
    the last read, and in between the peak is estimated as that read plus the resident growth since (growth is
    private memory, counted whole by both; an over- rather than an under-estimate).
    """

    def __init__(self, period: float = 0.2, step: float = 1.10):
        super().__init__(daemon=True)
        self.period, self.step, self.peak = period, step, 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        read_rss = read_pss = 0.0
        while not self._stop_event.wait(self.period):
            rss = _tree_memory_mb(os.getpid(), cheap=True)
            if rss > read_rss * self.step:
                read_rss, read_pss = rss, _tree_memory_mb(os.getpid())
            self.peak = max(self.peak, read_pss + max(0.0, rss - read_rss))

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return max(self.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _matmul_rate(dtype: str, device: str, size: int, repeats: int, threads: int | None = None) -> float:
    """Best-of-``repeats`` rate (FLOP/s) of torch's dense ``size x size`` product in ``dtype``."""
    import torch

    from features.encoder import DTYPES
    if threads:
        torch.set_num_threads(threads)
    a = torch.randn(size, size, device=device).to(DTYPES[dtype])
    b = torch.randn(size, size, device=device).to(DTYPES[dtype])
    best = float("inf")
    cuda = str(device).startswith("cuda")
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def matmul_flops_per_s(dtype: str, device: str, *, procs: int = 1, size: int = 2048, repeats: int = 5) -> float:
    """The machine's dense product rate in ``dtype``: the better of one process on every thread and (on CPU)
    ``procs`` single-thread processes at once (summed), as extraction uses the cores either way."""
    rate = _matmul_rate(dtype, device, size, repeats)
    if device == "cpu" and procs > 1:
        with worker_pool(procs, mp_context=multiprocessing.get_context("fork")) as pool:
            rate = max(rate, sum(f.result() for f in [pool.submit(_matmul_rate, dtype, device, size, repeats, 1)
                                                      for _ in range(procs)]))
    return rate


def reference_extraction(model_dir: str, paths: Sequence[str], dtype: str, device: str,
                         threads: int | None = None) -> float:
    """Seconds the peers' way takes for ``paths`` (importing transformers and loading the model included, when
    this process has not imported it yet): ``AutoModel`` in ``dtype``, one file per forward with
    ``output_hidden_states=True``, torch's default threads (``threads`` where given)."""
    import torch

    from features.encoder import DTYPES
    from pipeline.audio import load_audio
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    from transformers import AutoFeatureExtractor, AutoModel
    extractor = AutoFeatureExtractor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).to(device, dtype=DTYPES[dtype]).eval()
    with torch.inference_mode():
        for path in paths:
            wave = load_audio(path, sample_rate=extractor.sampling_rate)
            x = extractor(wave, sampling_rate=extractor.sampling_rate, return_tensors="pt")["input_values"]
            states = model(x.to(device, dtype=DTYPES[dtype]), output_hidden_states=True).hidden_states
            torch.stack(states, 1).float().cpu().numpy()
    return time.perf_counter() - start


class _GpuSampler(threading.Thread):
    """Samples ``torch.cuda.utilization()`` (needs nvidia-ml) every ``period`` seconds; None where unavailable."""

    def __init__(self, period: float = 0.2):
        super().__init__(daemon=True)
        self.period, self.samples = period, []
        self._stop_event = threading.Event()

    def run(self) -> None:
        import torch
        while not self._stop_event.wait(self.period):
            try:
                self.samples.append(torch.cuda.utilization())
            except Exception:  # no NVML here: nothing to sample  # noqa: BLE001
                return

    def stop(self) -> float | None:
        self._stop_event.set()
        self.join()
        return round(sum(self.samples) / len(self.samples) / 100, 3) if self.samples else None


def _run_one(model_dir: str, manifest: str, out: str, dtype: str, device: str, threads: int) -> dict:
    """One dtype, in its own process: this tool's extraction (start-up included) and the ceiling."""
    import torch

    from features.encoder import load_encoder
    from features.extract import extract
    torch.set_num_threads(threads)
    rows = pd.read_csv(manifest)
    load = os.getloadavg()[0]
    memory, gpu = _PeakMemory(), _GpuSampler()
    memory.start()
    start = time.perf_counter()
    enc = load_encoder(model_dir, device=device, dtype=dtype)
    cuda = enc.device.type == "cuda"
    procs = 1 if cuda else threads
    if cuda:  # utilisation during the extraction, on the GPU asked for (cuda:N included)
        torch.cuda.set_device(enc.device)
        torch.cuda.reset_peak_memory_stats(enc.device)
        gpu.start()
    summary = extract([manifest], out, encoder=enc, procs=procs)
    if cuda:
        torch.cuda.synchronize(enc.device)
    wall = time.perf_counter() - start
    peak_mb = memory.stop()
    utilisation = gpu.stop() if cuda else None
    peak_gpu_mb = torch.cuda.max_memory_allocated(enc.device) / 2**20 if cuda else None  # before the product probe
    audio = summary["audio_seconds"]
    torch.set_num_threads(threads)
    peak = matmul_flops_per_s(dtype, str(enc.device), procs=procs, size=8192 if cuda else 2048)
    flops = sum(encoder_flops(enc.model.config, int(round(d * enc.sample_rate))) for d in rows["duration_s"])
    flops_per_audio_s = flops / audio
    throughput, computing = audio / wall, audio / summary["compute_seconds"]
    record = {"device": str(enc.device), "dtype": dtype, "audio_seconds": round(audio, 2), "files": len(rows),
              "wall_seconds": round(wall, 3), "throughput": round(throughput, 3),
              "ceiling_ratio": float(f"{throughput / (peak / flops_per_audio_s):.4g}"),
              "startup_seconds": round(wall - summary["compute_seconds"], 3),
              "compute_throughput": round(computing, 3),
              "compute_ceiling_ratio": float(f"{computing / (peak / flops_per_audio_s):.4g}"),
              "matmul_gflops": round(peak / 1e9, 1), "encoder_gflop_per_audio_s": round(flops_per_audio_s / 1e9, 2),
              "feature_encoder": enc.feature_encoder, "feature_encoder_timing": enc.feature_encoder_timing,
              "peak_rss_mb": round(peak_mb, 1), "procs": procs, "threads": threads if procs == 1 else 1,
              "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)]}
    if cuda:
        record.update(gpu=torch.cuda.get_device_name(enc.device), gpu_utilisation=utilisation,
                      peak_gpu_mb=round(peak_gpu_mb, 1))
    return record


def _cosine(store_a: str, store_b: str) -> float:
    from features.store import FeatureStore
    with FeatureStore(store_a) as a, FeatureStore(store_b) as b:
        sims = []
        for uid in a.ids():
            x, y = a.pooled(uid).ravel().astype(np.float64), b.pooled(uid).ravel().astype(np.float64)
            sims.append(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
    return float(np.mean(sims))


def bench(*, device: str = "auto", audio_seconds: float = 1200.0, dtypes: Sequence[str] | None = None,
          manifest: str | None = None, corpus: Path = DEFAULT_CORPUS, threads: int | None = None,
          config=None, isolate: bool = True) -> list[dict]:
    """Run the benchmark; returns one record per dtype (float32 first, the cosine reference).

    Args:
        device: ``auto``, ``cpu`` or ``cuda``.
        audio_seconds: about how much audio to extract per dtype.
        dtypes: default ``float32, bfloat16`` (plus ``float16`` on CUDA).
        manifest: a manifest to take files from instead of ``corpus``.
        corpus: folder of audio files (default ``../shared/corpora/ravdess``).
        threads: cores to use (default: all): on CPU that many single-thread encoder processes.
        config: a ``Wav2Vec2Config`` (default: base); tests pass a tiny one.
        isolate: run each dtype in a fresh process (own peak memory, no cross-talk); tests turn it off.
    """
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from features.encoder import resolve_device
    dev = str(resolve_device(device))  # cuda:N kept: the GPU asked for
    dtypes = list(dtypes or (["float32", "bfloat16"] + (["float16"] if dev.startswith("cuda") else [])))
    dtypes = ["float32"] + [d for d in dtypes if d != "float32"]
    threads = threads or os.cpu_count()
    records = []
    with tempfile.TemporaryDirectory(prefix="ser-bench-") as tmp:
        rows = pick_files(manifest=manifest, corpus=corpus, audio_seconds=audio_seconds)
        rows.to_csv(f"{tmp}/manifest.csv", index=False)
        torch.manual_seed(0)
        Wav2Vec2Model(config or Wav2Vec2Config()).eval().save_pretrained(f"{tmp}/model")
        Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(f"{tmp}/model")
        for dtype in dtypes:
            args = (f"{tmp}/model", f"{tmp}/manifest.csv", f"{tmp}/{dtype}", dtype, dev, threads)
            reference = (f"{tmp}/model", list(rows["path"]), dtype, dev, threads)
            if isolate:  # each in a fresh process: this tool, then the reference
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    record = pool.submit(_run_one, *args).result()
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    reference_wall = pool.submit(reference_extraction, *reference).result()
            else:
                record = _run_one(*args)
                reference_wall = reference_extraction(*reference)
            record = {**record, "reference_throughput": round(record["audio_seconds"] / reference_wall, 3),
                      "vs_reference": float(f"{reference_wall / record['wall_seconds']:.4g}"),
                      "compute_vs_reference": float(f"{record['compute_throughput'] * reference_wall / record['audio_seconds']:.4g}")}
            record["cosine_vs_float32"] = round(_cosine(f"{tmp}/{dtype}", f"{tmp}/float32"), 6)
            print(json.dumps(record), flush=True)
            records.append(record)
    return records


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m features.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=Device.AUTO, type=device_arg, metavar="{auto,cpu,cuda,cuda:N}")
    p.add_argument("--audio-seconds", type=positive_float, default=1200.0)
    p.add_argument("--dtypes", default=None, help="comma-separated, e.g. float32,bfloat16")
    p.add_argument("--manifest", default=None, help="take files from this manifest")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="or from this folder (default %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--json", default=None, help="write the records here as a JSON list")
    a = p.parse_args(argv)
    records = bench(device=a.device, audio_seconds=a.audio_seconds, manifest=a.manifest, corpus=a.corpus,
                    dtypes=a.dtypes.split(",") if a.dtypes else None, threads=a.threads)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(records, indent=2) + "\n")
    return records


if __name__ == "__main__":
    main()
