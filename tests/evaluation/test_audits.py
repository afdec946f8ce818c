"""The audits: the leakage audit pairs a system across splits; the cross-corpus matrix from a multi-corpus run."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from baselines.train import main as train_main
from baselines.train import train_sklearn
from evaluation.audits import SYSTEM_KEYS
from features.egemaps import main as egemaps_main
from pipeline.compare import compare
from pipeline.compare import main as compare_main
from pipeline.manifest import main as manifest_main
from pipeline.split import describe, make_split
from pipeline.split import main as split_main

F0 = {"neutral": 110.0, "happy": 260.0, "sad": 160.0, "angry": 380.0}


def _random_split(manifest, folder):
    """The speaker-dependent random split of ``manifest``, written with its sidecar into ``folder``."""
    rows = pd.read_csv(manifest, dtype={"id": str, "speaker": str})
    random = make_split(rows, scheme="random", seed=0)
    random.to_csv(folder / "splits_random.csv", index=False)
    (folder / "splits_random.json").write_text(json.dumps(describe(random, rows, scheme="random", seed=0)))
    return folder / "splits_random.csv"


def test_a_system_under_random_and_speaker_kfold_splits_is_paired(baseline_experiment, tmp_path):
    manifest, kfold, features = baseline_experiment
    random_split = _random_split(manifest, tmp_path)
    common = {"features": str(features), "manifests": [str(manifest)], "model": "rf", "label_set": "four",
              "settings": {"n_estimators": 20}}
    honest = train_sklearn(split=str(kfold), out=str(tmp_path / "runs" / "rf"), **common)
    leaky = train_sklearn(split=str(random_split), out=str(tmp_path / "runs" / "rf_random"),
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
    random_split = _random_split(manifest, tmp_path)
    common = {"features": str(features), "manifests": [str(manifest)], "model": "rf", "label_set": "four"}
    train_sklearn(split=str(kfold), out=str(tmp_path / "runs" / "rf"), settings={"n_estimators": 20}, **common)
    train_sklearn(split=str(random_split), out=str(tmp_path / "runs" / "rf_random"),
                  settings={"n_estimators": 30}, **common)  # another forest: another system

    compare([tmp_path / "runs"], tmp_path / "compare", resamples=50)

    assert pd.read_csv(tmp_path / "compare" / "leakage.csv").empty


CODES = {"ravdess": {"neutral": "01", "happy": "03", "sad": "04", "angry": "05"},
         "emodb": {"neutral": "N", "happy": "F", "sad": "T", "angry": "W"},
         "tess": {e: e for e in F0}}


def _corpora(root, write_audio) -> dict[str, str]:
    """Two speakers x four emotions x two utterances per corpus, named by each corpus's convention."""
    names = []
    for emotion, f0 in F0.items():
        for k in (1, 2):
            for actor in (1, 2):
                names.append(("ravdess", f"Actor_{actor:02d}/03-01-{CODES['ravdess'][emotion]}-01-0{k}-01-"
                                         f"{actor:02d}.wav", f0 * (1 + 0.03 * actor)))
            for speaker in ("03", "08"):
                names.append(("emodb", f"wav/{speaker}a0{k}{CODES['emodb'][emotion]}a.wav", f0 * 1.05))
            for speaker in ("OAF", "YAF"):
                names.append(("tess", f"{speaker}_{emotion}/{speaker}_word{k}_{emotion}.wav", f0 * 0.95))
    for corpus, name, f0 in names:
        write_audio(root / corpus / name, seconds=0.8, f0=f0, seed=len(name) + int(f0))
    return {corpus: str(root / corpus) for corpus in CODES}


def test_a_cross_corpus_random_forest_fills_the_matrix(tmp_path, write_audio):
    roots = _corpora(tmp_path / "corpora", write_audio)
    data = tmp_path / "data"
    assert manifest_main([arg for c, r in roots.items() for arg in ("--corpus", c, "--root", r)]
                    + ["--out", str(data / "manifest.csv"), "--workers", "2"]) == 0
    rows = pd.read_csv(data / "manifest.csv")
    assert rows.groupby("corpus").size().to_dict() == {"emodb": 16, "ravdess": 16, "tess": 16}
    assert split_main(["--manifest", str(data / "manifest.csv"), "--scheme", "cross_corpus",
                  "--out", str(data / "splits.csv")]) == 0
    egemaps_main(["--manifest", str(data / "manifest.csv"), "--out", str(data / "egemaps"),
             "--skips", str(data / "egemaps.skips.csv"), "--workers", "2"])
    assert train_main(["--model", "rf", "--n-estimators", "30", "--features", str(data / "egemaps"),
                  "--manifest", str(data / "manifest.csv"), "--split", str(data / "splits.csv"),
                  "--label-set", "common", "--out", str(data / "runs" / "rf_egemaps")]) == 0
    protocol = json.loads((data / "runs" / "rf_egemaps" / "metrics.json").read_text())["protocol"]
    assert protocol["split_scheme"] == "cross_corpus" and len(protocol["train_corpora"]) == 3

    compare_main([str(data / "runs"), "--out", str(data / "compare"), "--manifest", str(data / "manifest.csv"),
             "--resamples", "50"])

    cross = pd.read_csv(data / "compare" / "cross_corpus.csv")
    cells = {(r.train, r.test): r.n_test for r in cross.itertuples()}
    assert cells == {(tr, te): 16 for tr in CODES for te in CODES if tr != te}  # 3 x 2 held-out cells
    assert cross["ua"].between(0, 1).all()
    table = pd.read_csv(data / "compare" / "table.csv")
    assert table["n_test"].tolist() == [96]  # each utterance tested in the two folds that hold its corpus out
    assert table["ua_ci_low"].iloc[0] <= table["ua"].iloc[0] <= table["ua_ci_high"].iloc[0]
    report = (data / "compare" / "report.md").read_text()
    assert "| train \\ test | emodb | ravdess | tess |" in report


def _two_corpora():
    from tests.pipeline.test_compare import utterances
    return pd.concat([utterances(corpus="ravdess"), utterances(corpus="cremad")], ignore_index=True)


def test_the_cross_corpus_matrix_keeps_each_system_apart(tmp_path):
    from tests.pipeline.test_compare import synthetic_run
    data = _two_corpora()
    for layer, accuracy in ((3, 0.95), (9, 0.3)):
        synthetic_run(tmp_path, f"probe{layer}", model="logreg", feature_set="wav2vec2", data=data,
                      accuracy=accuracy, system=f"probe_enc_L{layer:02d}", probe_layer=layer)
    compare([tmp_path / "runs"], tmp_path / "out", resamples=50, formats=["csv"])
    cross = pd.read_csv(tmp_path / "out" / "cross_corpus.csv")
    assert sorted(set(cross["system"])) == ["probe_enc_L03", "probe_enc_L09"]
    assert (cross["n_runs"] == 1).all()
    ua = cross.groupby("system")["ua"].mean()
    assert ua["probe_enc_L03"] > 0.8 > 0.5 > ua["probe_enc_L09"]


def test_one_configuration_under_two_names_pairs_each_name_with_its_own_leaky_run(tmp_path):
    from tests.pipeline.test_compare import synthetic_run
    for name, leaky_accuracy in (("conv", 0.9), ("conv_big", 0.6)):  # one name the start of the other
        synthetic_run(tmp_path, name, model="conv", feature_set="wav2vec2", system=name, accuracy=0.5)
        synthetic_run(tmp_path, f"{name}_random", model="conv", feature_set="wav2vec2", scheme="random",
                      system=f"{name}_random", accuracy=leaky_accuracy)
    table = compare([tmp_path / "runs"], tmp_path / "out", resamples=50, formats=["csv"])
    leakage = pd.read_csv(tmp_path / "out" / "leakage.csv")
    leaky_ua = table.set_index("system")["ua"]
    assert sorted(leakage["system"]) == ["conv", "conv_big"]
    for row in leakage.itertuples():
        assert row.leaky_ua == pytest.approx(leaky_ua[f"{row.system}_random@random"])


def test_one_name_over_two_configurations_gives_two_matrices_not_a_crash(tmp_path):
    from tests.pipeline.test_compare import synthetic_run
    data = _two_corpora()
    synthetic_run(tmp_path / "old", "rf", data=data, scheme="speaker_kfold")  # a run that records no settings
    synthetic_run(tmp_path / "new", "rf", data=data, scheme="corpus_holdout", settings={"n_estimators": 500})
    table = compare([tmp_path / "old" / "runs", tmp_path / "new" / "runs"], tmp_path / "out", resamples=20,
                    formats=["md"])
    cross = pd.read_csv(tmp_path / "out" / "cross_corpus.csv")
    assert len(set(cross["system"])) == 2 and set(cross["system"]) <= {"rf_egemaps", *table["system"]}
    assert (tmp_path / "out" / "report.md").read_text().count("Cross-corpus matrix") == 1
