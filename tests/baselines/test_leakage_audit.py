"""The leakage audit on the protocols the trainers really write: the same RandomForest under the speaker
k-fold split and under the speaker-dependent random split becomes one row of ``leakage.csv``."""

from __future__ import annotations

import json

import pandas as pd

from baselines.train import train_sklearn
from pipeline.audits import SYSTEM_KEYS
from pipeline.compare import compare
from pipeline.split import describe, make_split


def test_a_system_under_random_and_speaker_kfold_splits_is_paired(baseline_experiment, tmp_path):
    manifest, kfold, features = baseline_experiment
    rows = pd.read_csv(manifest, dtype={"id": str, "speaker": str})
    random = make_split(rows, scheme="random", seed=0)
    random.to_csv(tmp_path / "splits_random.csv", index=False)
    (tmp_path / "splits_random.json").write_text(json.dumps(describe(random, rows, scheme="random", seed=0)))
    common = {"features": str(features), "manifests": [str(manifest)], "model": "rf", "label_set": "four",
              "settings": {"n_estimators": 20}}
    honest = train_sklearn(split=str(kfold), out=str(tmp_path / "runs" / "rf"), **common)
    leaky = train_sklearn(split=str(tmp_path / "splits_random.csv"), out=str(tmp_path / "runs" / "rf_random"),
                          **common)
    # The two protocols differ in the split's description (train_corpora per fold included), not the system.
    assert honest["protocol"]["train_corpora"] != leaky["protocol"]["train_corpora"]
    assert {k: honest["protocol"].get(k) for k in SYSTEM_KEYS} == {k: leaky["protocol"].get(k) for k in SYSTEM_KEYS}

    compare([tmp_path / "runs"], tmp_path / "compare", resamples=50)

    leakage = pd.read_csv(tmp_path / "compare" / "leakage.csv")
    assert leakage[["system", "leaky_split", "split"]].values.tolist() == [["rf_egemaps", "random", "speaker_kfold"]]
    assert leakage["ua_diff"].iloc[0] == leakage["leaky_ua"].iloc[0] - leakage["ua"].iloc[0]
    report = (tmp_path / "compare" / "report.md").read_text()
    assert "| `rf_egemaps` | four | random (" in report


def test_a_different_system_under_the_random_split_is_not_paired(baseline_experiment, tmp_path):
    manifest, kfold, features = baseline_experiment
    rows = pd.read_csv(manifest, dtype={"id": str, "speaker": str})
    random = make_split(rows, scheme="random", seed=0)
    random.to_csv(tmp_path / "splits_random.csv", index=False)
    (tmp_path / "splits_random.json").write_text(json.dumps(describe(random, rows, scheme="random", seed=0)))
    common = {"features": str(features), "manifests": [str(manifest)], "model": "rf", "label_set": "four"}
    train_sklearn(split=str(kfold), out=str(tmp_path / "runs" / "rf"), settings={"n_estimators": 20}, **common)
    train_sklearn(split=str(tmp_path / "splits_random.csv"), out=str(tmp_path / "runs" / "rf_random"),
                  settings={"n_estimators": 30}, **common)  # another forest: another system

    compare([tmp_path / "runs"], tmp_path / "compare", resamples=50)

    assert pd.read_csv(tmp_path / "compare" / "leakage.csv").empty
