"""baselines.train: RandomForest, SVM and the MFCC-CNN on every fold, and faults that never lose a run."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from baselines.train import main, train_mfcc_cnn
from features.store import FeatureStore, escape_id
from inference.model import Predictor
from pipeline.audio import load_audio
from training.fit import TrainConfig
from training.rundir import load_run


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
    run = Predictor.from_run(load_run(tmp_path))
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
    settings = metrics["protocol"]["settings"]  # what tells two MFCC-CNNs apart in a comparison
    assert settings["lr"] == 3e-3 and settings["epochs"] == 25 and settings["dropout"] == 0.3
    assert settings["log_mel"]["n_mels"] == 32 and settings["threads"] == 1
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.columns) == ["fold", "member", "epoch", "train_loss", "val_loss", "val_acc"]
    run = Predictor.from_run(load_run(tmp_path))
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


REPO = Path(__file__).resolve().parents[2]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _args(experiment, out, *extra, features=None):
    manifest, split, store = experiment
    return ["--manifest", str(manifest), "--split", str(split), "--out", str(out), "--label-set", "four",
            "--features", str(features or store), *extra]


@pytest.fixture
def previous_run(baseline_experiment, tmp_path):
    out = tmp_path / "run"
    assert main(_args(baseline_experiment, out, "--model", "rf", "--n-estimators", "10")) == 0
    return out, snapshot(out)


def test_kill_mid_run_leaves_the_previous_run_as_it_was(baseline_experiment, previous_run, kill_after_first_fold):
    out, before = previous_run
    kill_after_first_fold(["baselines.train", *_args(baseline_experiment, out, "--model", "rf",
                                                     "--n-estimators", "4000")], out, "fold_0.joblib")
    assert snapshot(out) == before and len(Predictor.from_run(load_run(out)).folds) == 3


def test_non_finite_features_are_refused_and_nothing_is_written(baseline_experiment, previous_run, tmp_path,
                                                               capsys):
    out, before = previous_run
    corrupt = tmp_path / "corrupt.h5"
    shutil.copytree(baseline_experiment[2], corrupt)
    with FeatureStore(corrupt) as fs:
        shard = fs.shard_of("syn/syn_02/happy_1")
    with h5py.File(shard, "r+") as h5:  # written through HDF5: the values are wrong, the checksums right
        h5["utterances"][escape_id("syn/syn_02/happy_1")]["pooled"][0, 4] = np.inf
    assert main(_args(baseline_experiment, out, "--model", "svm", features=corrupt)) == 1
    err = capsys.readouterr().err
    assert "corrupt.h5: 1 utterances have NaN or infinite features, e.g. ['syn/syn_02/happy_1']" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("extra, message", [
    (["--model", "rf", "--n-estimators", "0"], "--n-estimators: expected a whole number of at least 1"),
    (["--model", "svm", "--C", "-1"], "--C: expected a finite number above 0"),
    (["--model", "rf", "--layers", "0,0"], "--layers: expected each layer once"),
    (["--model", "mfcc_cnn", "--batch-size", "0"], "--batch-size: expected a whole number of at least 1"),
    (["--model", "mfcc_cnn", "--n-mels", "0"], "--n-mels: expected a whole number of at least 1"),
])
def test_bad_numbers_are_refused_before_any_work(baseline_experiment, previous_run, extra, message, capsys):
    out, before = previous_run
    with pytest.raises(SystemExit) as exit_:
        main(_args(baseline_experiment, out, *extra))
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert snapshot(out) == before


def test_contradicting_options_are_usage_errors(baseline_experiment, previous_run, capsys):
    out, before = previous_run
    assert main(_args(baseline_experiment, out, "--model", "mfcc_cnn", "--n-mels", "20", "--n-mfcc", "40")) == 2
    assert "--n-mfcc 40: expected at most --n-mels (20)" in capsys.readouterr().err
    assert main(_args(baseline_experiment, out, "--model", "rf", "--n-jobs", "0")) == 2
    assert snapshot(out) == before
