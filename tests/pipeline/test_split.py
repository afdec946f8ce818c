import json

import pandas as pd
import pytest

from pipeline.split import check_speaker_independent, main, make_split, read_split, speaker_groups


def _manifest(corpus, speakers, emotions=("neutral", "happy", "sad", "angry"), per=2, gender=None):
    rows = []
    for s in speakers:
        for e in emotions:
            for k in range(per):
                rows.append({"id": f"{corpus}/{s}/{e}{k}", "corpus": corpus, "speaker": f"{corpus}_{s}",
                             "gender": gender(s) if gender else "unknown", "emotion": e})
    return pd.DataFrame(rows)


RAVDESS = _manifest("ravdess", [f"{a:02d}" for a in range(1, 25)], gender=lambda s: "male" if int(s) % 2 else "female")


def _speakers(splits, manifest, fold, part):
    ids = splits[(splits.fold == fold) & (splits.partition == part)]["id"]
    return sorted(manifest.set_index("id").loc[ids, "speaker"].unique())


def test_actor_holdout_is_the_seed_protocol():
    splits = make_split(RAVDESS, scheme="actor_holdout")
    assert set(splits.fold) == {0}
    assert _speakers(splits, RAVDESS, 0, "val") == ["ravdess_21", "ravdess_22"]
    assert _speakers(splits, RAVDESS, 0, "test") == ["ravdess_23", "ravdess_24"]
    assert len(_speakers(splits, RAVDESS, 0, "train")) == 20
    assert len(splits) == len(RAVDESS)


def test_ravdess_kfold_six_groups_of_four():
    splits = make_split(RAVDESS, scheme="speaker_kfold")
    assert sorted(splits.fold.unique()) == list(range(6))
    tested = []
    for fold in range(6):
        test, val = _speakers(splits, RAVDESS, fold, "test"), _speakers(splits, RAVDESS, fold, "val")
        assert len(test) == 4 and len(val) == 4 and not set(test) & set(val)
        genders = RAVDESS.drop_duplicates("speaker").set_index("speaker").loc[test, "gender"]
        assert sorted(genders) == ["female", "female", "male", "male"]
        tested += test
    assert sorted(tested) == sorted(RAVDESS.speaker.unique())  # every actor is tested exactly once
    check_speaker_independent(splits, RAVDESS)


def test_a_rejected_file_keeps_ravdess_folds_of_consecutive_actors():
    short = RAVDESS.drop(index=5)  # one utterance of actor 01 rejected (too short, empty)
    splits = make_split(short, scheme="speaker_kfold")
    assert [_speakers(splits, short, fold, "test") for fold in range(6)] == [
        [f"ravdess_{a:02d}" for a in range(4 * f + 1, 4 * f + 5)] for f in range(6)]
    other = make_split(short, scheme="speaker_kfold", n_folds=4)  # not the protocol: balanced groups
    assert [len(_speakers(other, short, fold, "test")) for fold in range(4)] == [6, 6, 6, 6]


@pytest.mark.parametrize("corpus,speakers,folds", [("savee", ["DC", "JE", "JK", "KL"], 4),
                                                   ("emodb", ["03", "08", "09", "10", "11", "12", "13", "14", "15", "16"], 10),
                                                   ("tess", ["OAF", "YAF"], 2)])
def test_leave_one_speaker_out(corpus, speakers, folds):
    manifest = _manifest(corpus, speakers)
    splits = make_split(manifest, scheme="speaker_kfold")
    assert splits.fold.nunique() == folds
    for fold in range(folds):
        assert len(_speakers(splits, manifest, fold, "test")) == 1
        assert len(_speakers(splits, manifest, fold, "val")) == (0 if corpus == "tess" else 1)


def test_cremad_groups_are_balanced():
    manifest = _manifest("cremad", [str(1001 + i) for i in range(91)], gender=lambda s: "male" if int(s) % 3 else "female")
    groups = speaker_groups(manifest, 5)
    assert sorted(len(g) for g in groups) == [18, 18, 18, 18, 19]
    assert sorted(s for g in groups for s in g) == sorted(manifest.speaker.unique())


def test_multi_corpus_splits_within_each_corpus():
    manifest = pd.concat([RAVDESS, _manifest("savee", ["DC", "JE", "JK", "KL"])], ignore_index=True)
    splits = make_split(manifest, scheme="speaker_kfold")
    assert splits.fold.nunique() == 4  # the smaller protocol: every utterance tested exactly once
    tests = splits[splits.partition == "test"]
    assert tests["id"].is_unique and len(tests) == len(manifest)
    check_speaker_independent(splits, manifest)


def test_random_split_is_stratified_and_marked(tmp_path):
    path = tmp_path / "m.csv"
    RAVDESS.to_csv(path, index=False)
    assert main(["--manifest", str(path), "--scheme", "random", "--out", str(tmp_path / "s.csv")]) == 0
    splits, info = read_split(tmp_path / "s.csv")
    assert info["speaker_independent"] is False and info["scheme"] == "random"
    test = splits[splits.partition == "test"].merge(RAVDESS, on="id")
    assert test.emotion.value_counts().nunique() == 1  # equal share of every emotion
    with pytest.raises(ValueError, match="not speaker-independent"):
        check_speaker_independent(splits, RAVDESS)


def test_guard_names_the_leaked_speaker():
    splits = make_split(RAVDESS, scheme="actor_holdout")
    leaked = RAVDESS[RAVDESS.speaker == "ravdess_23"]["id"].iloc[0]
    splits.loc[splits["id"] == leaked, "partition"] = "train"
    with pytest.raises(ValueError, match=r"fold 0: ravdess_23 in test\+train"):
        check_speaker_independent(splits, RAVDESS)


def test_split_ids_must_come_from_the_manifest():
    splits = pd.DataFrame({"fold": [0], "id": ["ravdess/unknown"], "partition": ["train"]})
    with pytest.raises(ValueError, match="not in the manifest"):
        check_speaker_independent(splits, RAVDESS)


def test_cli_writes_sidecar_and_rejects_bad_scheme(tmp_path):
    path = tmp_path / "m.csv"
    RAVDESS.to_csv(path, index=False)
    assert main(["--manifest", str(path), "--scheme", "speaker_kfold", "--out", str(tmp_path / "s.csv")]) == 0
    info = json.loads((tmp_path / "s.json").read_text())
    assert info["n_folds"] == 6 and info["speaker_independent"] is True
    assert list(pd.read_csv(tmp_path / "s.csv").columns) == ["fold", "id", "partition"]
    with pytest.raises(SystemExit):
        main(["--manifest", str(path), "--scheme", "by_utterance", "--out", str(tmp_path / "x.csv")])
    with pytest.raises(ValueError, match="unknown split scheme"):
        make_split(RAVDESS, scheme="by_utterance")


def test_real_ravdess_splits(ravdess_root, tmp_path):
    from pipeline.manifest import scan_corpus

    manifest, _ = scan_corpus("ravdess", ravdess_root, progress=False)
    for scheme in ("actor_holdout", "speaker_kfold"):
        splits = make_split(manifest, scheme=scheme)
        check_speaker_independent(splits, manifest)
    assert splits.fold.nunique() == 6


def test_cross_corpus_trains_on_one_corpus_and_tests_on_the_others():
    savee = _manifest("savee", ["DC", "JE", "JK", "KL"])
    manifest = pd.concat([RAVDESS, savee], ignore_index=True)
    splits = make_split(manifest, scheme="cross_corpus")
    corpus = splits["id"].map(manifest.set_index("id")["corpus"])
    assert splits.fold.nunique() == 2
    for fold, train_corpus in enumerate(["ravdess", "savee"]):
        sel = splits.fold == fold
        assert set(corpus[sel & (splits.partition == "train")]) == {train_corpus}
        assert set(corpus[sel & (splits.partition == "val")]) == {train_corpus}
        assert train_corpus not in set(corpus[sel & (splits.partition == "test")])
    check_speaker_independent(splits, manifest)
    with pytest.raises(ValueError, match="at least 2 corpora"):
        make_split(RAVDESS, scheme="cross_corpus")


def test_random_split_keeps_a_test_utterance_of_small_classes():
    small = _manifest("ravdess", ["01", "02"], per=2)  # 4 utterances per emotion
    splits = make_split(small, scheme="random")
    test = splits[splits.partition == "test"].merge(small, on="id")
    assert sorted(test.emotion.value_counts().to_dict().items()) == [(e, 1) for e in ("angry", "happy", "neutral", "sad")]


def test_cli_refuses_a_repeated_row_and_a_manifest_without_corpus(tmp_path, capsys):
    path = tmp_path / "m.csv"
    pd.concat([RAVDESS, RAVDESS.iloc[:1]]).to_csv(path, index=False)
    assert main(["--manifest", str(path), "--scheme", "actor_holdout", "--out", str(tmp_path / "s.csv")]) == 2
    assert "expected unique ids, found 1 repeated" in capsys.readouterr().err
    RAVDESS.drop(columns=["corpus"]).to_csv(path, index=False)
    assert main(["--manifest", str(path), "--scheme", "speaker_kfold", "--out", str(tmp_path / "s.csv")]) == 1
    assert "the manifest lacks columns ['corpus']" in capsys.readouterr().err


def test_speaker_kfold_without_genders_balances_by_size():
    groups = speaker_groups(RAVDESS.drop(columns=["gender"]), n_folds=5)
    assert sorted(s for g in groups for s in g) == sorted(RAVDESS["speaker"].unique()) and len(groups) == 5


def test_guard_sees_one_speaker_written_two_ways_and_refuses_utterances_without_speaker():
    manifest = _manifest("ravdess", ["01", "02"])
    ids = manifest["id"]
    splits = pd.DataFrame({"fold": 0, "id": ids, "partition": ["train"] * 8 + ["test"] * 8})
    check_speaker_independent(splits, manifest)  # two speakers, one on each side
    merged = manifest.assign(speaker=["ravdess_01"] * 4 + ["RAVDESS_01 "] * 4 + ["ravdess_02"] * 8)
    splits = pd.DataFrame({"fold": 0, "id": ids, "partition": ["train"] * 4 + ["test"] * 12})
    with pytest.raises(ValueError, match=r"RAVDESS_01 /ravdess_01 in test\+train"):
        check_speaker_independent(splits, merged)
    unnamed = manifest.assign(speaker=[None] * 2 + list(manifest["speaker"][2:]))
    with pytest.raises(ValueError, match="2 split ids have no speaker in the manifest"):
        check_speaker_independent(splits, unnamed)


def test_fold_counts_a_scheme_cannot_honour_are_refused():
    one = _manifest("savee", ["DC"])
    with pytest.raises(ValueError, match=r"at least 2 speakers in every corpus, found \{'savee': 1\}"):
        make_split(pd.concat([RAVDESS, one], ignore_index=True), scheme="speaker_kfold")
    with pytest.raises(ValueError, match="--folds 30: expected at most 24"):
        make_split(RAVDESS, scheme="speaker_kfold", n_folds=30)
    with pytest.raises(ValueError, match="only speaker_kfold has a fold count"):
        make_split(RAVDESS, scheme="actor_holdout", n_folds=3)
    blank = RAVDESS.copy()
    blank.loc[3, "speaker"] = None
    with pytest.raises(ValueError, match="expected a speaker on every manifest row, found 1"):
        make_split(blank, scheme="random")


def test_a_failed_split_run_leaves_the_earlier_split_and_sidecar(tmp_path, monkeypatch):
    import pipeline.split as split_module

    path, out = tmp_path / "m.csv", tmp_path / "s.csv"
    RAVDESS.to_csv(path, index=False)
    assert main(["--manifest", str(path), "--scheme", "actor_holdout", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("describe failed")

    monkeypatch.setattr(split_module, "describe", broken)
    with pytest.raises(RuntimeError):
        main(["--manifest", str(path), "--scheme", "random", "--out", str(out)])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no new CSV beside the old sidecar
