"""heads.train end to end on the synthetic experiment: learning, outputs, normalisation, early stopping,
determinism, the loader, and the refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from features.store import FeatureStore, write_store
from heads.data import Normaliser
from heads.fit import FoldData, TrainConfig, evaluate, fit
from heads.models import build_head
from heads.runs import load_run
from heads.train import main, train_heads

FAST = TrainConfig(epochs=30, patience=5, lr=1e-2, batch_size=16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(experiment, out, **kw):
    manifest, split, features = experiment
    kw = {"head": "conv", "label_set": "four", "config": FAST, **kw}
    return train_heads(features=str(features), manifests=[str(manifest)], split=str(split), out=str(out), **kw)


@pytest.fixture(scope="module")
def conv_run(experiment, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv_run")
    return out, _train(experiment, out)


def test_conv_head_learns_and_writes_the_run_directory(conv_run):
    out, metrics = conv_run
    assert metrics["ua"] >= 0.95 and metrics["wa"] >= 0.95 and metrics["macro_f1"] >= 0.95
    assert metrics["labels"] == ["neutral", "happy", "sad", "angry"]
    assert len(metrics["folds"]) == 3 and metrics["n_test"] == 144 and metrics["n_speakers"] == 6
    assert np.array(metrics["confusion_matrix"]).sum() == 144
    assert set(metrics["per_class"]["sad"]) == {"precision", "recall", "f1", "support"}
    protocol = metrics["protocol"]
    assert protocol["normalisation"] == "global" and protocol["speaker_independent"] is True
    assert protocol["split_scheme"] == "speaker_kfold" and protocol["n_folds"] == 3 and protocol["seed"] == 0
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == ["id", "fold", "true", "pred", "neutral", "happy", "sad", "angry"]
    np.testing.assert_allclose(predictions[metrics["labels"]].sum(axis=1), 1.0, atol=1e-4)
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == ["fold", "member", "epoch", "train_loss", "val_loss", "val_acc"]
    weights = json.loads((out / "layer_weights.json").read_text())
    assert weights["layers"] == [0, 1] and len(weights["folds"]) == 3
    assert weights["mean"][1] > weights["mean"][0]  # the class signal is in layer 1
    for fold in range(3):
        assert (out / "models" / f"fold_{fold}.safetensors").is_file()


def test_linear_head_learns(experiment, tmp_path):
    assert _train(experiment, tmp_path, head="linear")["ua"] >= 0.95


def test_global_normalisation_is_fitted_on_training_speakers_only(experiment, conv_run):
    out, _ = conv_run
    splits = pd.read_csv(experiment[1])
    config = json.loads((out / "models" / "fold_0.json").read_text())
    with FeatureStore(experiment[2]) as store:
        def stacked(ids):
            return np.concatenate([store.all_frames(i) for i in ids], axis=1)

        train = splits.query("fold == 0 and partition == 'train'")["id"]
        np.testing.assert_allclose(config["normalisation"]["mean"], stacked(train).mean(axis=1), rtol=1e-4)
        everyone = stacked(splits.query("fold == 0")["id"]).mean(axis=1)
        assert not np.allclose(config["normalisation"]["mean"], everyone, rtol=1e-3)


def test_speaker_normalisation_is_labelled(experiment, tmp_path):
    metrics = _train(experiment, tmp_path, head="linear", normalisation="speaker")
    assert metrics["protocol"]["normalisation"] == "speaker"
    assert json.loads((tmp_path / "models" / "fold_0.json").read_text())["normalisation"] == {"mode": "speaker"}


def test_same_seed_gives_identical_metrics(experiment, conv_run, tmp_path):
    out, metrics = conv_run
    again = _train(experiment, tmp_path)
    assert again == {**metrics, "protocol": again["protocol"]} and again["protocol"] == metrics["protocol"]
    assert (tmp_path / "predictions.csv").read_text() == (out / "predictions.csv").read_text()
    assert (tmp_path / "history.csv").read_text() == (out / "history.csv").read_text()


def test_folds_in_parallel_processes_give_the_same_run(experiment, conv_run, tmp_path):
    out, metrics = conv_run
    again = _train(experiment, tmp_path, jobs=2)  # each fold in a fresh process, one torch thread each
    assert again == {**metrics, "protocol": again["protocol"]}
    assert (tmp_path / "predictions.csv").read_text() == (out / "predictions.csv").read_text()
    assert (tmp_path / "history.csv").read_text() == (out / "history.csv").read_text()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(p.name for p in (out / "models").iterdir())


def test_early_stopping_restores_the_best_epoch():
    rng = np.random.default_rng(0)
    arrays, labels = {}, {}
    for i in range(80):  # training: separable; validation: random labels, so validation loss soon rises
        uid, c = f"u{i}", i % 2
        arrays[uid] = rng.normal(0, 1, (1, 12, 4)).astype(np.float32)
        arrays[uid][0, :, 0] += 2.0 * c
        labels[uid] = c if i < 60 else int(rng.integers(0, 2))
    data = FoldData(lambda u: arrays[u], Normaliser("none"), labels, {u: "s" for u in arrays})
    train_ids, val_ids = [f"u{i}" for i in range(60)], [f"u{i}" for i in range(60, 80)]
    torch.manual_seed(0)
    model = build_head("conv", num_layers=1, input_dim=4, num_classes=2, dropout=0.0)
    config = TrainConfig(epochs=60, patience=3, lr=3e-2, batch_size=10)
    history, best = fit(model, data, train_ids, val_ids, config, np.random.default_rng(0), num_classes=2)
    assert len(history) < 60 and len(history) == best + 3
    assert best == int(history["val_loss"].idxmin()) + 1
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.ones(2))
    _, val_loss = evaluate(model, data, val_ids, config, loss_fn)
    assert val_loss == pytest.approx(history["val_loss"].iloc[best - 1], rel=1e-5)


def test_load_run_reproduces_a_folds_predictions(experiment, conv_run):
    out, metrics = conv_run
    run = load_run(out)
    assert run.kind == "head" and run.model == "conv" and run.labels == metrics["labels"]
    assert run.feature_settings["used_layers"] == [0, 1] and run.feature_settings["encoder"] == "synthetic"
    predictions = pd.read_csv(out / "predictions.csv").query("fold == 0")
    with FeatureStore(experiment[2]) as store:
        inputs = [store.all_frames(uid) for uid in predictions["id"]]
    fold0 = dataclasses.replace(run, folds=run.folds[:1]).predict_proba(inputs)
    np.testing.assert_allclose(fold0, predictions[run.labels].to_numpy(), atol=1e-5)
    mean = run.predict_proba(inputs[:3])
    assert mean.shape == (3, 4) and np.allclose(mean.sum(axis=1), 1.0, atol=1e-5)


def test_an_ensemble_averages_its_members_in_every_fold(experiment, conv_run, tmp_path):
    out, single = conv_run
    metrics = _train(experiment, tmp_path, members=2, jobs=2)
    assert metrics["protocol"]["ensemble"] == 2 and single["protocol"]["ensemble"] == 1
    assert all(len(f["best_epoch"]) == 2 for f in metrics["folds"]) and metrics["ua"] >= 0.95
    history = pd.read_csv(tmp_path / "history.csv")
    assert sorted(history.groupby(["fold", "member"]).groups) == [(k, m) for k in range(3) for m in range(2)]
    # member 0 is the single model of the same seed; the fold's predictions are the members' mean
    member0 = history.query("member == 0").drop(columns="member").reset_index(drop=True)
    pd.testing.assert_frame_equal(member0, pd.read_csv(out / "history.csv").drop(columns="member"))
    run = load_run(tmp_path)
    assert len(run.folds) == 6 and [cfg["member"] for _, cfg in run.folds[:2]] == [0, 1]
    predictions = pd.read_csv(tmp_path / "predictions.csv").query("fold == 1")
    with FeatureStore(experiment[2]) as store:
        inputs = [store.all_frames(uid) for uid in predictions["id"]]
    fold1 = dataclasses.replace(run, folds=run.folds[2:4]).predict_proba(inputs)
    np.testing.assert_allclose(fold1, predictions[run.labels].to_numpy(), atol=1e-5)
    _train(experiment, tmp_path, config=dataclasses.replace(FAST, epochs=1))  # a single model into the same DIR
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f"fold_{k}.{ext}" for k in range(3)
                                                                     for ext in ("json", "safetensors")]


def _cli(experiment, out, *extra):
    manifest, split, features = experiment
    return main(["--features", str(features), "--manifest", str(manifest), "--split", str(split),
                 "--head", "linear", "--out", str(out), "--epochs", "1", *extra])


def test_unknown_label_set_is_refused(experiment, tmp_path, capsys):
    assert _cli(experiment, tmp_path, "--label-set", "seven") == 2
    assert "unknown label set 'seven'; expected one of" in capsys.readouterr().err


def test_features_missing_utterances_are_refused(experiment, tmp_path):
    manifest, split, features = experiment
    with FeatureStore(features) as store:
        ids = store.ids()
        entries = {uid: (store.all_frames(uid), None) for uid in ids[5:]}
    write_store(tmp_path / "partial.h5", entries, {"kind": "wav2vec2"})
    with pytest.raises(ValueError, match=r"partial.h5 lacks 5 of the 144 utterances .*e\.g\. \['syn/"):
        _train((manifest, split, tmp_path / "partial.h5"), tmp_path / "run")


def test_leaked_speaker_is_refused_unless_random(experiment, tmp_path, capsys):
    manifest, split, features = experiment
    splits = pd.read_csv(split)
    leak = splits.index[(splits["fold"] == 1) & splits["id"].str.startswith("syn/syn_01/neutral")][:1]
    splits.loc[leak, "partition"] = "val"  # syn_01 trains in fold 1; one of its utterances now validates
    bad = tmp_path / "leaky.csv"
    splits.to_csv(bad, index=False)
    bad.with_suffix(".json").write_text(json.dumps({"scheme": "speaker_kfold", "speaker_independent": True}))
    assert _cli((manifest, bad, features), tmp_path / "run", "--label-set", "four") == 1  # bad data
    assert "not speaker-independent" in capsys.readouterr().err
    bad.with_suffix(".json").write_text(json.dumps({"scheme": "random", "speaker_independent": False}))
    assert _cli((manifest, bad, features), tmp_path / "run", "--label-set", "four") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["protocol"]["speaker_independent"] is False and metrics["protocol"]["split_scheme"] == "random"


def test_augmented_copies_train_only_where_their_source_trains(experiment, tmp_path):
    manifest, split, features = experiment
    original = pd.read_csv(manifest)
    copies = original.iloc[::4].assign(source_id=lambda f: f["id"], augmentation="gain")
    copies["id"] = copies["id"] + "@aug0"
    copies.to_csv(tmp_path / "augmented.csv", index=False)
    with FeatureStore(features) as store:
        entries = {uid: (store.all_frames(uid), None) for uid in store.ids()}
    entries.update({row.id: (entries[row.source_id][0] * 1.01, None) for row in copies.itertuples()})
    write_store(tmp_path / "with_copies.h5", entries, {"kind": "wav2vec2"})
    common = {"features": str(tmp_path / "with_copies.h5"),
              "manifests": [str(manifest), str(tmp_path / "augmented.csv")], "split": str(split), "head": "linear", "label_set": "four", "config": TrainConfig(epochs=2)}
    metrics = train_heads(out=str(tmp_path / "run"), **common)
    assert metrics["protocol"]["augmentation"] is True and metrics["n_test"] == 144
    assert not pd.read_csv(tmp_path / "run" / "predictions.csv")["id"].str.contains("@aug").any()
    off = train_heads(out=str(tmp_path / "off"), augmentation=False, **common)
    assert off["protocol"]["augmentation"] is False


def _training_parser():
    import argparse

    from heads.train import add_training_args

    parser = argparse.ArgumentParser(prog="python -m heads.train")
    parser.add_argument("--head", required=True)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--pooling", default=None)
    add_training_args(parser)
    return parser


def test_settings_of_params_yaml_are_the_defaults_and_flags_win(tmp_path, monkeypatch):
    """dvc.yaml passes each system's block of params.yaml with --settings: the one place of the settings."""
    import yaml

    from heads.train import parse_with_settings

    params = Path(__file__).resolve().parents[2] / "params.yaml"
    monkeypatch.chdir(tmp_path)  # the inputs the command line names must exist
    (tmp_path / "m.csv").touch()
    (tmp_path / "s.csv").touch()
    block = yaml.safe_load(params.read_text())["systems"]["conv_egemaps"]["settings"]
    base = ["--manifest", "m.csv", "--split", "s.csv", "--label-set", "ravdess8", "--out", "run",
            "--settings", str(params), "--settings-key", "systems.conv_egemaps.settings"]
    args = parse_with_settings(_training_parser(), [*base, "--lr", "0.0003"])
    assert (args.head, args.epochs, args.hidden, args.pooling, args.weight_decay) == (
        block["head"], block["epochs"], block["hidden"], block["pooling"], block["weight_decay"])
    assert args.lr == 3e-4  # the command line wins


@pytest.mark.parametrize("key, message", [("systems.nothing", "found no 'nothing'"),
                                          ("systems.conv_egemaps", "trainer is not an option")])
def test_settings_that_name_no_block_or_no_option_are_refused(key, message, capsys):
    from heads.train import parse_with_settings

    params = Path(__file__).resolve().parents[2] / "params.yaml"
    with pytest.raises(SystemExit) as exit_:
        parse_with_settings(_training_parser(), ["--manifest", "m.csv", "--split", "s.csv", "--label-set", "x",
                                                 "--out", "r", "--settings", str(params), "--settings-key", key])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--ensemble", "0"), ("--threads", "0"), ("--jobs", "-1"), ("--jobs", "two")])
def test_counts_below_one_are_refused_with_a_clear_error(option, value, experiment, tmp_path, capsys):
    manifest, split, features = experiment
    with pytest.raises(SystemExit) as exit_:
        main(["--features", str(features), "--head", "conv", "--manifest", str(manifest), "--split", str(split),
              "--label-set", "ravdess8", "--out", str(tmp_path / "run"), option, value])
    assert exit_.value.code == 2
    assert f"{option}: expected a whole number of at least 1, found {value!r}" in capsys.readouterr().err
