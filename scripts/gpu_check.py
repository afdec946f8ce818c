"""The check a lent GPU machine runs (through ``scripts/gpu-check.sh``): CUDA float32 hidden states against CPU
float32 on 20 RAVDESS files, then ``features.bench`` over the corpus. ``--device cpu`` is a dry run of the same
steps (the "device" pass then runs on CPU too, over less audio), so the script is tested where no GPU is.

Writes ``exactness.json`` and ``bench.json`` to ``--out`` and prints both.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from features.bench import DEFAULT_CORPUS, bench
from features.extract import extract
from features.store import FeatureStore


def exactness(corpus: Path, device: str, files: int, work: Path) -> dict:
    """Extract ``files`` RAVDESS files with a random base-size model in float32 on CPU and on ``device`` (the
    library's modules on both, so that only the device differs); the largest relative difference
    (max |a - b| / max |b| per layer) over every stored layer of every file.

    Raises:
        FileNotFoundError: ``corpus`` holds fewer than ``files`` FLAC files.
    """
    found = sorted(corpus.resolve().rglob("*.flac"))  # absolute: the manifest is written elsewhere
    if len(found) < files:
        raise FileNotFoundError(f"{corpus}: expected at least {files} RAVDESS .flac files, found {len(found)}; "
                                "pass --corpus DIR (the 16 kHz FLAC copy of RAVDESS) or fewer --files.")
    paths = found[::len(found) // files][:files]
    manifest = work / "manifest.csv"
    pd.DataFrame({"id": [p.stem for p in paths], "path": [str(p) for p in paths],
                  "duration_s": [sf.info(p).duration for p in paths]}).to_csv(manifest, index=False)
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config()).eval().save_pretrained(work / "model")
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(work / "model")
    seconds = {}
    for name, dev in (("cpu", "cpu"), ("device", device)):
        start = time.perf_counter()
        extract([manifest], work / name, encoder=str(work / "model"), device=dev, dtype="float32",
                storage_dtype="float32", feature_encoder="library")  # the same modules: only the device differs
        seconds[name] = round(time.perf_counter() - start, 2)
    worst, pooled = 0.0, 0.0
    with FeatureStore(work / "cpu") as a, FeatureStore(work / "device") as b:
        for uid in a.ids():
            x, y = a.all_frames(uid), b.all_frames(uid)
            worst = max(worst, max(float(np.abs(x[i] - y[i]).max() / np.abs(x[i]).max()) for i in range(len(x))))
            p, q = a.pooled(uid), b.pooled(uid)
            pooled = max(pooled, float(np.abs(p - q).max() / np.abs(p).max()))
        attrs = b.attrs
    return {"device": device, "files": len(paths), "max_relative_difference": worst,
            "max_relative_difference_pooled": pooled, "within_1e-5": worst <= 1e-5, "seconds": seconds,
            "device_store": {k: attrs.get(k) for k in ("device", "dtype", "provenance")}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--audio-seconds", type=float, default=None,
                   help="benchmark audio (default: all of the corpus on CUDA, 60 s for the CPU dry run)")
    p.add_argument("--out", type=Path, default=Path("gpu-check"))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ser-gpu-check-") as tmp:
        result = exactness(a.corpus, a.device, a.files, Path(tmp))
    (a.out / "exactness.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    audio = a.audio_seconds or (1e9 if a.device == "cuda" else 60.0)
    records = bench(device=a.device, audio_seconds=audio, corpus=a.corpus)
    (a.out / "bench.json").write_text(json.dumps(records, indent=2) + "\n")
    return {"exactness": result, "bench": records}


if __name__ == "__main__":
    main()
