"""heads.train: heads learn and write the run directory; reproducible, refused settings, faults that never lose a run;
heads over extracted wav2vec2 features."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from features.extract import main as extract_main
from features.store import FeatureStore, escape_id, write_store
from heads.train import main, train_heads
from heads.train import main as train_main
from inference.model import Predictor
from pipeline.audio import write_audio
from pipeline.split import describe, make_split
from training.fit import TrainConfig
from training.rundir import load_run

F0 = {"neutral": 110.0, "happy": 260.0, "sad": 160.0, "angry": 380.0}


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
    # every setting that changes the figures, defaults included, so that compare never averages two configurations
    assert protocol["settings"] == {"hidden": 128, "dropout": 0.2, "pooling": "mean", **dataclasses.asdict(FAST),
                                    "threads": 1}
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


def test_load_run_reproduces_a_folds_predictions(experiment, conv_run):
    out, metrics = conv_run
    run = Predictor.from_run(load_run(out))
    assert run.kind == "head" and run.model == "conv" and run.labels == metrics["labels"]
    assert run.feature_settings["used_layers"] == [0, 1] and run.feature_settings["encoder"] == "synthetic"
    predictions = pd.read_csv(out / "predictions.csv").query("fold == 0")
    with FeatureStore(experiment[2]) as store:
        inputs = [store.all_frames(uid) for uid in predictions["id"]]
    fold0 = dataclasses.replace(run, folds=run.folds[:1]).predict_proba(inputs)
    np.testing.assert_allclose(fold0, predictions[run.labels].to_numpy(), atol=1e-5)
    mean = run.predict_proba(inputs[:3])
    assert mean.shape == (3, 4) and np.allclose(mean.sum(axis=1), 1.0, atol=1e-5)


def test_a_run_over_reordered_layers_takes_the_stores_order_or_its_own_when_told(experiment, tmp_path):
    out = tmp_path / "run"
    _train(experiment, out, head="linear", layers=[1, 0], config=dataclasses.replace(FAST, epochs=3))
    run = Predictor.from_run(load_run(out))
    one = dataclasses.replace(run, folds=run.folds[:1])
    predictions = pd.read_csv(out / "predictions.csv").query("fold == 0")
    with FeatureStore(experiment[2]) as store:
        stored = [store.all_frames(uid) for uid in predictions["id"]]  # the store's order: layer 0, layer 1
    expected = predictions[run.labels].to_numpy()
    np.testing.assert_allclose(one.predict_proba(stored, all_layers=True), expected, atol=1e-5)
    np.testing.assert_allclose(one.predict_proba([x[[1, 0]] for x in stored], all_layers=False), expected,
                               atol=1e-5)
    with pytest.raises(ValueError, match="pass all_layers=True"):  # two layers either way: it cannot tell
        one.predict_proba(stored)
    with pytest.raises(ValueError, match="input of 1 layers: expected 2"):
        one.predict_proba([x[:1] for x in stored], all_layers=True)


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
    run = Predictor.from_run(load_run(tmp_path))
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


def test_a_split_without_its_sidecar_is_checked_and_recorded_speaker_independent(experiment, tmp_path):
    manifest, split, features = experiment
    bare = tmp_path / "mine.csv"  # a split made elsewhere: the CSV alone
    shutil.copy(split, bare)
    metrics = _train((manifest, bare, features), tmp_path / "run", config=dataclasses.replace(FAST, epochs=1))
    assert metrics["protocol"]["speaker_independent"] is True  # checked, so compare ranks it as such


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

    from pipeline.cli import LayerList
    from training.options import add_training_args

    parser = argparse.ArgumentParser(prog="python -m heads.train")
    parser.add_argument("--head", required=True)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--pooling", default=None)
    parser.add_argument("--layers", action=LayerList, default=None)  # as heads.train has it
    add_training_args(parser)
    return parser


def test_settings_of_params_yaml_are_the_defaults_and_flags_win(tmp_path, monkeypatch):
    """dvc.yaml passes each system's block of params.yaml with --settings: the one place of the settings."""
    import yaml

    from training.options import parse_with_settings

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
    from training.options import parse_with_settings

    params = Path(__file__).resolve().parents[2] / "params.yaml"
    with pytest.raises(SystemExit) as exit_:
        parse_with_settings(_training_parser(), ["--manifest", "m.csv", "--split", "s.csv", "--label-set", "x",
                                                 "--out", "r", "--settings", str(params), "--settings-key", key])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("setting, message", [("threads: 0", "threads = 0:"), ("seed: -1", "seed = -1:"),
                                              ("normalisation: bogus", "normalisation = 'bogus'"),
                                              ("balance: sideways", "balance = 'sideways'"),
                                              ('layers: "0,0"', "layers = '0,0': expected each layer once"),
                                              ("layers: [1, x]", "layers = [1, 'x']: expected")])
def test_settings_are_checked_as_the_command_line_is(setting, message, tmp_path, capsys, monkeypatch):
    from training.options import parse_with_settings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.csv").touch()
    (tmp_path / "s.csv").touch()
    (tmp_path / "p.yaml").write_text(f"block:\n  head: linear\n  lr: 0.001\n  {setting}\n")
    argv = ["--manifest", "m.csv", "--split", "s.csv", "--label-set", "x", "--out", "r", "--settings", "p.yaml",
            "--settings-key", "block"]
    with pytest.raises(SystemExit) as exit_:
        parse_with_settings(_training_parser(), argv)
    assert exit_.value.code == 2 and f"p.yaml: block.{message}" in capsys.readouterr().err
    (tmp_path / "p.yaml").write_text("block:\n  head: linear\n  lr: 0.001\n  epochs: 7\n  layers: \"0,3\"\n")
    args = parse_with_settings(_training_parser(), argv)
    assert (args.lr, args.epochs, args.layers) == (0.001, 7, [0, 3])


@pytest.mark.parametrize("option, value", [("--ensemble", "0"), ("--threads", "0"), ("--jobs", "-1"), ("--jobs", "two")])
def test_counts_below_one_are_refused_with_a_clear_error(option, value, experiment, tmp_path, capsys):
    manifest, split, features = experiment
    with pytest.raises(SystemExit) as exit_:
        main(["--features", str(features), "--head", "conv", "--manifest", str(manifest), "--split", str(split),
              "--label-set", "ravdess8", "--out", str(tmp_path / "run"), option, value])
    assert exit_.value.code == 2
    assert f"{option}: expected a whole number of at least 1, found {value!r}" in capsys.readouterr().err


REPO = Path(__file__).resolve().parents[2]
QUICK = TrainConfig(epochs=2, patience=0, batch_size=16)


def _train_quick(experiment, out, **kw):
    manifest, split, features = experiment
    kw = {"head": "linear", "label_set": "four", "config": QUICK, **kw}
    return train_heads(features=str(features), manifests=[str(manifest)], split=str(split), out=str(out), **kw)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` and the digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def previous_run(experiment, tmp_path):
    """A complete run in ``tmp_path/run``, and its snapshot."""
    out = tmp_path / "run"
    _train_quick(experiment, out)
    return out, snapshot(out)


def _cli_four(experiment, out, *extra):
    manifest, split, features = experiment
    return main(["--features", str(features), "--manifest", str(manifest), "--split", str(split),
                 "--head", "linear", "--label-set", "four", "--out", str(out), *extra])


def test_kill_mid_training_leaves_the_previous_run_as_it_was(experiment, previous_run, kill_after_first_fold):
    out, before = previous_run
    manifest, split, features = experiment
    # killed with one fold saved in the staging folder, the others still training
    kill_after_first_fold(["heads.train", "--features", str(features), "--manifest", str(manifest),
                           "--split", str(split), "--head", "conv", "--label-set", "four", "--out", str(out),
                           "--epochs", "400", "--patience", "0", "--jobs", "1", "--threads", "1"],
                          out, "fold_0.safetensors")
    assert snapshot(out) == before
    assert len(Predictor.from_run(load_run(out)).folds) == 3
    _train_quick(experiment, out)  # the next run removes what the killed one left
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]


def test_a_failing_run_leaves_the_previous_run_as_it_was(experiment, previous_run, tmp_path):
    out, before = previous_run
    manifest, split, features = experiment
    corrupt = tmp_path / "corrupt.h5"
    shutil.copytree(features, corrupt)
    uid = "syn/syn_05/sad_2"  # trains in fold 0, so the failure comes after work has started
    with FeatureStore(corrupt) as fs:
        shard = fs.shard_of(uid)
    with h5py.File(shard, "r+") as h5:  # written through HDF5: the values are wrong, the checksums right
        frames = h5["utterances"][escape_id(uid)]["frames"]
        frames[0, 3] = np.nan  # one frame of layer 0: 8 values
    with pytest.raises(ValueError, match=rf"corrupt.h5: utterance '{uid}' has 8 NaN or infinite values"):
        _train_quick((manifest, split, corrupt), out)
    assert snapshot(out) == before and sorted(p.name for p in out.parent.iterdir()) == ["corrupt.h5", "run"]


@pytest.mark.parametrize("option, value, message", [
    ("--epochs", "0", "expected a whole number of at least 1, found '0'"),
    ("--epochs", "-2", "expected a whole number of at least 1, found '-2'"),
    ("--batch-size", "0", "expected a whole number of at least 1, found '0'"),
    ("--max-frames", "-5", "expected a whole number of at least 0, found '-5'"),
    ("--lr", "-0.1", "expected a finite number above 0, found '-0.1'"),
    ("--dropout", "1.5", "expected a number from 0 up to (not including) 1, found '1.5'"),
    ("--layers", "0,0", "expected each layer once, found [0] more than once"),
])
def test_bad_numbers_are_refused_before_any_work(experiment, previous_run, option, value, message, capsys):
    out, before = previous_run
    with pytest.raises(SystemExit) as exit_:
        _cli_four(experiment, out, option, value)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert snapshot(out) == before


def test_library_refuses_settings_that_train_nothing(experiment, tmp_path):
    with pytest.raises(ValueError, match=r"epochs=0.*expected epochs >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match=r"batch_size=0, max_frames=-5"):
        TrainConfig(batch_size=0, max_frames=-5)
    with pytest.raises(ValueError, match=r"layers \[1, 1\]: expected each layer once"):
        _train_quick(experiment, tmp_path / "run", layers=[1, 1])
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_refused_before_training(experiment, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(SystemExit) as exit_:
        _cli_four(experiment, tmp_path / "out")
    assert exit_.value.code == 2 and "expected a folder to write into, found the file" in capsys.readouterr().err
    with pytest.raises(NotADirectoryError, match="is a file; expected a run directory"):
        _train_quick(experiment, tmp_path / "out")
    assert (tmp_path / "out").read_text() == "a file"


def test_models_that_do_not_match_metrics_are_refused(experiment, previous_run, tmp_path):
    out, _ = previous_run
    missing = tmp_path / "missing"
    shutil.copytree(out, missing)
    for path in (missing / "models").glob("fold_2.*"):
        path.unlink()
    with pytest.raises(ValueError, match=r"missing \['fold_2'\], unexpected \[\]"):
        Predictor.from_run(load_run(missing))
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    for suffix in ("json", "safetensors"):
        shutil.copy(out / "models" / f"fold_0.{suffix}", mixed / "models" / f"fold_0_1.{suffix}")
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['fold_0_1'\]"):
        Predictor.from_run(load_run(mixed))
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    weights = damaged / "models" / "fold_1.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"fold_1.\{json,safetensors\} cannot be loaded"):
        Predictor.from_run(load_run(damaged))


def test_predict_refuses_a_run_missing_a_fold(experiment, previous_run, tmp_path, write_audio, capsys):
    from heads.predict import main as predict

    out, _ = previous_run
    for path in (out / "models").glob("fold_1.*"):
        path.unlink()
    status = predict([str(write_audio(tmp_path / "a.wav")), "--model", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and "missing ['fold_1']" in err and "Traceback" not in err


def test_a_class_missing_from_a_fold_is_reported(experiment, tmp_path, capsys):
    manifest, split, features = experiment
    import pandas as pd

    splits = pd.read_csv(split)
    drop = (splits["fold"] == 0) & (splits["partition"] == "train") & splits["id"].str.contains("/angry_")
    splits[~drop].to_csv(tmp_path / "splits.csv", index=False)
    shutil.copy(split.with_suffix(".json"), tmp_path / "splits.json")
    _train_quick((manifest, tmp_path / "splits.csv", features), tmp_path / "run")
    assert "warning: fold 0 has no train utterance of ['angry']" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n_test"] == 144


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
    run = Predictor.from_run(load_run(out))
    assert run.feature_settings["encoder"] and run.feature_settings["hidden_states"] == [0, 1, 2, 3]
    with FeatureStore(root / "w2v.h5") as store:
        proba = run.predict_proba([store.all_frames("syn/syn_0/sad_0")])
    assert proba.shape == (1, 4) and np.isclose(proba.sum(), 1.0, atol=1e-5)
