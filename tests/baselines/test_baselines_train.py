"""baselines.train end to end: rf and svm on utterance-level features, the MFCC-CNN on audio, the loader
and the refusals."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from baselines.train import main, train_mfcc_cnn
from features.store import FeatureStore
from heads.fit import TrainConfig
from heads.runs import load_run
from pipeline.audio import load_audio


def _cli(experiment, out, *extra):
    manifest, split, features = experiment
    return main(["--manifest", str(manifest), "--split", str(split), "--out", str(out), *extra])


@pytest.mark.parametrize("model", ["rf", "svm"])
def test_sklearn_baseline_learns_and_loads(baseline_experiment, tmp_path, model):
    features = baseline_experiment[2]
    assert _cli(baseline_experiment, tmp_path, "--features", str(features), "--model", model,
                "--label-set", "four", "--n-estimators", "50") == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["ua"] >= 0.95 and metrics["n_test"] == 96 and len(metrics["folds"]) == 3
    assert metrics["protocol"]["model"] == model and metrics["protocol"]["feature_set"] == "egemaps"
    assert metrics["protocol"]["system"] == f"{model}_egemaps" and metrics["protocol"]["fit_on"] == "train+val"
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert list(predictions.columns) == ["id", "fold", "true", "pred", *metrics["labels"]]
    run = load_run(tmp_path)
    assert run.kind == "sklearn" and run.model == model and run.labels == metrics["labels"]
    fold0 = predictions.query("fold == 0")
    with FeatureStore(features) as store:
        inputs = [store.pooled(uid) for uid in fold0["id"]]
    proba = dataclasses.replace(run, folds=run.folds[:1]).predict_proba(inputs)
    np.testing.assert_allclose(proba, fold0[run.labels].to_numpy(), atol=1e-5)


def test_sklearn_speaker_normalisation_is_labelled(baseline_experiment, tmp_path):
    assert _cli(baseline_experiment, tmp_path, "--features", str(baseline_experiment[2]), "--model", "rf",
                "--label-set", "four", "--n-estimators", "20", "--normalisation", "speaker") == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["protocol"]["normalisation"] == "speaker"


def test_mfcc_cnn_learns_from_audio_and_loads(baseline_experiment, tmp_path):
    manifest, split, _ = baseline_experiment
    torch.set_num_threads(1)
    metrics = train_mfcc_cnn(manifests=[str(manifest)], split=str(split), label_set="four", out=str(tmp_path),
                             config=TrainConfig(epochs=25, patience=8, lr=3e-3, batch_size=8),
                             log_mel_settings={"n_mels": 32})
    assert metrics["ua"] >= 0.8
    assert metrics["protocol"]["model"] == "mfcc_cnn" and metrics["protocol"]["feature_set"] == "logmel"
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.columns) == ["fold", "member", "epoch", "train_loss", "val_loss", "val_acc"]
    run = load_run(tmp_path)
    assert run.kind == "mfcc_cnn" and run.feature_settings["sample_rate"] == 16000
    fold0 = pd.read_csv(tmp_path / "predictions.csv").query("fold == 0")
    paths = pd.read_csv(manifest).set_index("id")["path"]
    waves = [load_audio(paths[uid]) for uid in fold0["id"]]
    proba = dataclasses.replace(run, folds=run.folds[:1]).predict_proba(waves)
    np.testing.assert_allclose(proba, fold0[run.labels].to_numpy(), atol=1e-5)


def test_missing_features_and_unknown_label_set_are_refused(baseline_experiment, tmp_path, capsys):
    assert _cli(baseline_experiment, tmp_path, "--model", "rf", "--label-set", "four") == 2
    assert "expected --features" in capsys.readouterr().err
    assert _cli(baseline_experiment, tmp_path, "--features", str(baseline_experiment[2]), "--model", "svm",
                "--label-set", "ravdess9") == 2
    assert "unknown label set 'ravdess9'" in capsys.readouterr().err
