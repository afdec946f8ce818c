"""heads.train end to end on wav2vec2 features that features.extract computes with the tiny random encoder."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from features.extract import main as extract_main
from features.store import FeatureStore
from heads.runs import load_run
from heads.train import main as train_main
from pipeline.audio import write_audio
from pipeline.split import describe, make_split

F0 = {"neutral": 110.0, "happy": 260.0, "sad": 160.0, "angry": 380.0}


@pytest.fixture(scope="module")
def wav2vec2_store(tmp_path_factory, tiny_encoder_dir):
    root = tmp_path_factory.mktemp("w2v")
    rng = np.random.default_rng(0)
    rows = []
    for s in range(6):
        for emotion, f0 in F0.items():
            for k in range(2):
                t = np.arange(int(rng.uniform(0.6, 1.2) * 16000)) / 16000
                x = 0.2 * sum(np.sin(2 * np.pi * j * f0 * (1 + 0.03 * s) * t) / j for j in range(1, 5))
                noise = 0.005 * rng.standard_normal(len(t))
                path = write_audio(root / "audio" / f"{s}_{emotion}_{k}.wav", x + noise, 16000)
                rows.append({"id": f"syn/syn_{s}/{emotion}_{k}", "path": str(path), "corpus": "syn",
                             "speaker": f"syn_{s}", "gender": "male", "emotion": emotion,
                             "duration_s": len(t) / 16000, "sample_rate": 16000, "channels": 1})
    manifest = pd.DataFrame(rows)
    manifest.to_csv(root / "manifest.csv", index=False)
    splits = make_split(manifest, scheme="speaker_kfold", n_folds=3)
    splits.to_csv(root / "splits.csv", index=False)
    (root / "splits.json").write_text(json.dumps(describe(splits, manifest, scheme="speaker_kfold", seed=0)))
    extract_main(["--manifest", str(root / "manifest.csv"), "--out", str(root / "w2v.h5"),
                  "--encoder", str(tiny_encoder_dir), "--device", "cpu"])
    return root


@pytest.mark.parametrize("head", ["conv", "linear"])
def test_head_trains_on_extracted_wav2vec2_features(wav2vec2_store, head, tmp_path):
    torch.set_num_threads(1)
    root = wav2vec2_store
    out = tmp_path / head
    assert train_main(["--features", str(root / "w2v.h5"), "--manifest", str(root / "manifest.csv"),
                       "--split", str(root / "splits.csv"), "--head", head, "--label-set", "four",
                       "--epochs", "3", "--batch-size", "8", "--max-frames", "40", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"]["feature_set"] == "wav2vec2" and metrics["protocol"]["system"] == f"{head}_wav2vec2"
    assert metrics["n_test"] == 48 and 0.0 <= metrics["ua"] <= 1.0
    weights = json.loads((out / "layer_weights.json").read_text())
    assert weights["layers"] == [0, 1, 2, 3] and np.isclose(sum(weights["mean"]), 1.0, atol=1e-5)
    run = load_run(out)
    assert run.feature_settings["encoder"] and run.feature_settings["hidden_states"] == [0, 1, 2, 3]
    with FeatureStore(root / "w2v.h5") as store:
        proba = run.predict_proba([store.all_frames("syn/syn_0/sad_0")])
    assert proba.shape == (1, 4) and np.isclose(proba.sum(), 1.0, atol=1e-5)
