"""End to end over three corpora: manifest -> cross_corpus split -> eGeMAPS -> RandomForest -> comparison.

Under ``cross_corpus`` every utterance is tested once in each fold that does not train on its corpus; the
comparison must take such runs and fill the cross-corpus matrix from them.
"""

from __future__ import annotations

import json

import pandas as pd

from baselines.train import main as train
from features.egemaps import main as egemaps
from pipeline.compare import main as compare
from pipeline.manifest import main as manifest
from pipeline.split import main as split

F0 = {"neutral": 110.0, "happy": 260.0, "sad": 160.0, "angry": 380.0}
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
    assert manifest([arg for c, r in roots.items() for arg in ("--corpus", c, "--root", r)]
                    + ["--out", str(data / "manifest.csv"), "--workers", "2"]) == 0
    rows = pd.read_csv(data / "manifest.csv")
    assert rows.groupby("corpus").size().to_dict() == {"emodb": 16, "ravdess": 16, "tess": 16}
    assert split(["--manifest", str(data / "manifest.csv"), "--scheme", "cross_corpus",
                  "--out", str(data / "splits.csv")]) == 0
    egemaps(["--manifest", str(data / "manifest.csv"), "--out", str(data / "egemaps"),
             "--skips", str(data / "egemaps.skips.csv"), "--workers", "2"])
    assert train(["--model", "rf", "--n-estimators", "30", "--features", str(data / "egemaps"),
                  "--manifest", str(data / "manifest.csv"), "--split", str(data / "splits.csv"),
                  "--label-set", "common", "--out", str(data / "runs" / "rf_egemaps")]) == 0
    protocol = json.loads((data / "runs" / "rf_egemaps" / "metrics.json").read_text())["protocol"]
    assert protocol["split_scheme"] == "cross_corpus" and len(protocol["train_corpora"]) == 3

    compare([str(data / "runs"), "--out", str(data / "compare"), "--manifest", str(data / "manifest.csv"),
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
