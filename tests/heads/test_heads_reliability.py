"""heads.train, heads.runs and heads.predict under faults: a killed or failed run leaves the previous one as it
was, bad options are refused before any work, non-finite features never reach training, and a run whose
models do not match its metrics.json is refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from features.store import FeatureStore, escape_id
from heads.fit import TrainConfig
from heads.runs import load_run
from heads.train import main, train_heads

REPO = Path(__file__).resolve().parents[2]
QUICK = TrainConfig(epochs=2, patience=0, batch_size=16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(experiment, out, **kw):
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
    _train(experiment, out)
    return out, snapshot(out)


def _cli(experiment, out, *extra):
    manifest, split, features = experiment
    return main(["--features", str(features), "--manifest", str(manifest), "--split", str(split),
                 "--head", "linear", "--label-set", "four", "--out", str(out), *extra])


def test_kill_mid_training_leaves_the_previous_run_as_it_was(experiment, previous_run):
    out, before = previous_run
    manifest, split, features = experiment
    command = [sys.executable, "-m", "heads.train", "--features", str(features), "--manifest", str(manifest),
               "--split", str(split), "--head", "conv", "--label-set", "four", "--out", str(out),
               "--epochs", "400", "--patience", "0", "--jobs", "1", "--threads", "1"]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = out.with_name(f".run.tmp-{process.pid}") / "models" / "fold_0.safetensors"
    deadline = time.monotonic() + 240
    while not staged.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert staged.exists(), "the trainer never saved its first fold"
    process.send_signal(signal.SIGKILL)  # one fold saved in the staging folder, the others still training
    process.wait()
    assert snapshot(out) == before
    assert len(load_run(out).folds) == 3
    _train(experiment, out)  # the next run removes what the killed one left
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
        _train((manifest, split, corrupt), out)
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
        _cli(experiment, out, option, value)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert snapshot(out) == before


def test_library_refuses_settings_that_train_nothing(experiment, tmp_path):
    with pytest.raises(ValueError, match=r"epochs=0.*expected epochs >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match=r"batch_size=0, max_frames=-5"):
        TrainConfig(batch_size=0, max_frames=-5)
    with pytest.raises(ValueError, match=r"layers \[1, 1\]: expected each layer once"):
        _train(experiment, tmp_path / "run", layers=[1, 1])
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_refused_before_training(experiment, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(SystemExit) as exit_:
        _cli(experiment, tmp_path / "out")
    assert exit_.value.code == 2 and "expected a folder to write into, found the file" in capsys.readouterr().err
    with pytest.raises(NotADirectoryError, match="is a file; expected a run directory"):
        _train(experiment, tmp_path / "out")
    assert (tmp_path / "out").read_text() == "a file"


def test_models_that_do_not_match_metrics_are_refused(experiment, previous_run, tmp_path):
    out, _ = previous_run
    missing = tmp_path / "missing"
    shutil.copytree(out, missing)
    for path in (missing / "models").glob("fold_2.*"):
        path.unlink()
    with pytest.raises(ValueError, match=r"missing \['fold_2'\], unexpected \[\]"):
        load_run(missing)
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    for suffix in ("json", "safetensors"):
        shutil.copy(out / "models" / f"fold_0.{suffix}", mixed / "models" / f"fold_0_1.{suffix}")
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['fold_0_1'\]"):
        load_run(mixed)
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    weights = damaged / "models" / "fold_1.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"fold_1.\{json,safetensors\} cannot be loaded"):
        load_run(damaged)


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
    _train((manifest, tmp_path / "splits.csv", features), tmp_path / "run")
    assert "warning: fold 0 has no train utterance of ['angry']" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n_test"] == 144
