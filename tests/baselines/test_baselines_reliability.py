"""baselines.train under faults: a killed or failing rf/svm run leaves the previous run as it was, non-finite
features are refused naming the utterances, and bad options are refused before any work."""

from __future__ import annotations

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

from baselines.train import main
from features.store import FeatureStore, escape_id
from heads.runs import load_run

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


def test_kill_mid_run_leaves_the_previous_run_as_it_was(baseline_experiment, previous_run):
    out, before = previous_run
    command = [sys.executable, "-m", "baselines.train",
               *_args(baseline_experiment, out, "--model", "rf", "--n-estimators", "4000")]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = out.with_name(f".run.tmp-{process.pid}") / "models" / "fold_0.joblib"
    deadline = time.monotonic() + 240
    while not staged.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert staged.exists() and process.poll() is None, "the trainer never saved its first fold"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert snapshot(out) == before and len(load_run(out).folds) == 3


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
