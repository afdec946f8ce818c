from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml

from pipeline.augment import (
    augment,
    augment_one,
    build_chain,
    copy_seed,
    main,
    plan_copies,
)
from pipeline.experiment import place_augmented
from pipeline.roots import read_manifest
from pipeline.split import check_speaker_independent

REPO = Path(__file__).resolve().parents[2]

CHAIN = {
    "time_stretch": {"p": 0.5, "min_rate": 0.9, "max_rate": 1.1},
    "pitch_shift": {"p": 0.5, "min_semitones": -2.0, "max_semitones": 2.0},
    "reverb": {"p": 0.3},
    "gain": {"p": 0.5, "min_gain_db": -6.0, "max_gain_db": 6.0},
    "color_noise": {"p": 0.8, "min_snr_db": 10.0, "max_snr_db": 30.0},
}
COLUMNS = ["id", "path", "corpus", "speaker", "gender", "emotion", "duration_s", "sample_rate", "channels"]


@pytest.fixture
def corpus(tmp_path, write_audio):
    """Speakers s1..s4 with ``{speaker: [emotions]}`` utterances of 0.4 s; returns the manifest."""

    def _make(emotions_by_speaker=None):
        emotions_by_speaker = emotions_by_speaker or {s: ["neutral", "happy", "sad"] for s in
                                                      ("s1", "s2", "s3", "s4")}
        rows = []
        for speaker, emotions in emotions_by_speaker.items():
            for i, emotion in enumerate(emotions):
                uid = f"synth/{speaker}/u{i}"
                path = write_audio(tmp_path / "corpus" / f"{uid}.wav", seconds=0.4, f0=120 + 15 * i,
                                   seed=len(rows))
                rows.append([uid, str(path), "synth", speaker, "female", emotion, 0.4, 16000, 1])
        return pd.DataFrame(rows, columns=COLUMNS)

    return _make


def split_of(manifest, folds):
    """Long-format split from ``[{speaker: partition}]``, one mapping per fold."""
    rows = [(f, uid, parts[spk]) for f, parts in enumerate(folds)
            for uid, spk in zip(manifest["id"], manifest["speaker"], strict=True)]
    return pd.DataFrame(rows, columns=["fold", "id", "partition"])


# s4 is never in training: its utterances must never be copied.
KFOLD = [{"s1": "train", "s2": "train", "s3": "val", "s4": "test"},
         {"s1": "val", "s2": "test", "s3": "train", "s4": "val"}]


def test_copies_come_only_from_training_and_keep_speaker_and_label(corpus, tmp_path):
    manifest = corpus()
    out = augment(manifest, split_of(manifest, KFOLD), out_dir=tmp_path / "aug", chain=CHAIN, copies=2,
                  workers=1, progress=False)
    assert list(out.columns) == COLUMNS + ["source_id", "augmentation"]
    assert len(out) == 2 * 9 and out["id"].is_unique
    assert set(out["source_id"]) == set(manifest.loc[manifest["speaker"] != "s4", "id"])
    source = manifest.set_index("id").loc[out["source_id"]]
    assert (out["speaker"].to_numpy() == source["speaker"].to_numpy()).all()
    assert (out["emotion"].to_numpy() == source["emotion"].to_numpy()).all()
    for row in out.itertuples():
        x, rate = sf.read(row.path)
        assert rate == row.sample_rate == 16000 and x.ndim == 1 and row.channels == 1
        assert len(x) / rate == pytest.approx(row.duration_s)
        assert sf.info(row.path).format == "FLAC"
        assert row.augmentation and row.augmentation != "none"
    written = read_manifest(tmp_path / "aug" / "manifest.csv")
    pd.testing.assert_frame_equal(written, out, check_dtype=False)
    on_disk = pd.read_csv(tmp_path / "aug" / "manifest.csv")["path"]  # relative: the same in every clone
    assert on_disk.tolist() == [f"{uid}.flac" for uid in out["id"]]


def test_rerun_and_worker_count_give_identical_files(corpus, tmp_path):
    manifest = corpus()
    splits = split_of(manifest, KFOLD)
    runs = {}
    for name, workers in (("a", 1), ("b", 2), ("c", 1)):
        out = augment(manifest, splits, out_dir=tmp_path / name, chain=CHAIN, copies=2, seed=7,
                      workers=workers, progress=False)
        runs[name] = out.drop(columns="path"), {uid: (tmp_path / name / f"{uid}.flac").read_bytes()
                                                for uid in out["id"]}
    for name in ("b", "c"):
        pd.testing.assert_frame_equal(runs[name][0], runs["a"][0])
        assert runs[name][1] == runs["a"][1]
    other = augment(manifest, splits, out_dir=tmp_path / "d", chain=CHAIN, copies=2, seed=8, workers=1,
                    progress=False)
    assert (other["augmentation"] != runs["a"][0]["augmentation"]).any()


def test_counts_with_and_without_balancing(corpus, tmp_path):
    manifest = corpus({"s1": ["neutral", "happy", "happy", "sad", "calm"],
                       "s2": ["happy", "happy", "sad", "sad", "fearful"],
                       "s3": ["neutral", "neutral", "neutral", "neutral", "neutral"]})
    splits = split_of(manifest, [{"s1": "train", "s2": "train", "s3": "test"}])
    emotion = manifest.set_index("id")["emotion"]

    plain = augment(manifest, splits, out_dir=tmp_path / "plain", chain=CHAIN, copies=1, workers=1,
                    progress=False)
    assert plain["source_id"].value_counts().eq(1).all() and len(plain) == 10

    # four: calm and fearful are left out; train has neutral 1, happy 4, sad 3 -> 8 of each in the end.
    balanced = augment(manifest, splits, out_dir=tmp_path / "bal", chain=CHAIN, copies=1, balance=True,
                       label_set="four", workers=1, progress=False)
    train = manifest[manifest["speaker"] != "s3"]
    totals = (pd.concat([train["emotion"], emotion.loc[balanced["source_id"]]]).value_counts())
    assert totals[["neutral", "happy", "sad"]].tolist() == [8, 8, 8]
    assert not balanced["emotion"].isin(["calm", "fearful"]).any()

    # calm merged into neutral and counted with it: neutral 2, happy 4, sad 3; copies 0 tops up to 4.
    topped = augment(manifest, splits, out_dir=tmp_path / "top", chain=CHAIN, copies=0, balance=True,
                     label_set="four", merge_calm=True, workers=1, progress=False)
    merged = emotion.replace({"calm": "neutral"})
    assert merged.loc[topped["source_id"]].value_counts().to_dict() == {"neutral": 2, "sad": 1}
    assert set(topped.loc[topped["emotion"] == "calm", "source_id"]) <= {"synth/s1/u4"}


def test_plan_spreads_remainders_over_a_class():
    classes = pd.Series(["a"] * 3 + ["b"] * 7, index=[f"u{i}" for i in range(10)])
    plan = plan_copies(classes, copies=1, balance=True, seed=0)
    assert plan[classes == "a"].sum() == 11 and set(plan[classes == "a"]) == {3, 4}
    assert plan[classes == "b"].tolist() == [1] * 7


def test_copies_zero_writes_an_empty_manifest_through_the_cli(corpus, tmp_path):
    manifest = corpus()
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    split_of(manifest, KFOLD).to_csv(tmp_path / "splits.csv", index=False)
    assert main(["--manifest", str(tmp_path / "manifest.csv"), "--split", str(tmp_path / "splits.csv"),
                 "--out", str(tmp_path / "aug"), "--copies", "0", "--balance", "false"]) == 0
    written = pd.read_csv(tmp_path / "aug" / "manifest.csv")
    assert list(written.columns) == COLUMNS + ["source_id", "augmentation"] and written.empty
    assert not list((tmp_path / "aug").rglob("*.flac"))


def test_cli_reads_the_chain_from_params(corpus, tmp_path):
    manifest = corpus({"s1": ["neutral", "happy"], "s2": ["sad"]})
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    split_of(manifest, [{"s1": "train", "s2": "test"}]).to_csv(tmp_path / "splits.csv", index=False)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"augment": {"chain": {"gain": {"p": 1.0, "min_gain_db": -3,
                                                                     "max_gain_db": -3}}}}))
    args = ["--manifest", str(tmp_path / "manifest.csv"), "--split", str(tmp_path / "splits.csv"),
            "--out", str(tmp_path / "aug"), "--copies", "1", "--chain", str(params), "--workers", "1"]
    assert main([*args, "--chain-key", "augment.chain"]) == 0
    written = pd.read_csv(tmp_path / "aug" / "manifest.csv")
    assert written["augmentation"].tolist() == ["gain(gain_db=-3)"] * 2
    assert main([*args, "--chain-key", "augment.chains"]) == 2


def test_cli_without_chain_uses_the_projects_params_chain(corpus, tmp_path, monkeypatch, capsys):
    """The README's `python -m pipeline.augment --manifest M --split S --out DIR --copies 1` works as written."""
    manifest = corpus({"s1": ["neutral", "happy"], "s2": ["sad"]})
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    split_of(manifest, [{"s1": "train", "s2": "test"}]).to_csv(tmp_path / "splits.csv", index=False)
    args = ["--manifest", str(tmp_path / "manifest.csv"), "--split", str(tmp_path / "splits.csv"),
            "--out", str(tmp_path / "aug"), "--copies", "1", "--workers", "1"]
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2  # no params.yaml here: a clear error, not "found no chain"
    assert "expected the augmentation chain in params.yaml, found no such file" in capsys.readouterr().err
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    assert main(args) == 0
    written = pd.read_csv(tmp_path / "aug" / "manifest.csv")
    used = {step.split("(")[0] for text in written["augmentation"] for step in text.split("; ")}
    assert len(written) == 2 and used <= set(yaml.safe_load((REPO / "params.yaml").read_text())["augment"]["chain"])


@pytest.mark.parametrize(("chain", "message"), [
    ({"echo": {}}, "unknown transform 'echo'"),
    ({"gain": {"loudness": 3}}, "unknown parameter(s) ['loudness']"),
    ({"pitch_shift": {"min_semitones": 2, "max_semitones": -2}}, "inverted range, min_semitones=2"),
    ({"reverb": {"min_rt60": 0.9}}, "inverted range, min_rt60=0.9 > max_rt60=0.6"),
    ({"reverb": {"max_wet": 1.5}}, "expected 0 < rt60 and 0 <= wet <= 1"),
    ({"gain": {"p": 1.5}}, "p=1.5 is not a probability"),
    ({"time_stretch": {"min_rate": 0.01}}, "min_rate must be >= 0.1"),
    ([("gain", {})], "expected the augmentation chain as a mapping"),
])
def test_bad_chains_are_refused(chain, message):
    with pytest.raises(ValueError) as err:
        build_chain(chain)
    assert message in str(err.value)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"copies": -1}, "expected copies to be a whole number >= 0, found -1"),
    ({"copies": 1.5}, "found 1.5"),
    ({"copies": 1, "chain": {"gain": {"p": 0.0}}}, "expected a chain with a transform of p > 0"),
    ({"copies": 1, "chain": {}}, "pass --chain params.yaml"),
    ({"copies": 1, "label_set": "five"}, "unknown label set 'five'"),
])
def test_bad_arguments_are_refused(corpus, tmp_path, kwargs, message):
    manifest = corpus({"s1": ["neutral"], "s2": ["sad"]})
    splits = split_of(manifest, [{"s1": "train", "s2": "test"}])
    with pytest.raises(ValueError) as err:
        augment(manifest, splits, out_dir=tmp_path / "aug", **{"chain": CHAIN, **kwargs})
    assert message in str(err.value)
    assert not (tmp_path / "aug").exists()


def test_unreadable_sources_are_counted_in_rejects(corpus, tmp_path, capsys):
    manifest = corpus({"s1": ["neutral", "happy", "sad"], "s2": ["sad"]})
    Path(manifest.loc[1, "path"]).write_bytes(b"")
    splits = split_of(manifest, [{"s1": "train", "s2": "test"}])
    out = augment(manifest, splits, out_dir=tmp_path / "aug", chain=CHAIN, copies=1, workers=2,
                  progress=False)
    assert sorted(out["source_id"]) == ["synth/s1/u0", "synth/s1/u2"]
    rejects = pd.read_csv(tmp_path / "aug" / "rejects.csv")
    assert rejects[["path", "reason"]].values.tolist() == [[manifest.loc[1, "path"], "empty"]]
    assert "1 sources unreadable, skipped" in capsys.readouterr().out


def test_a_missing_source_is_a_counted_reject_not_the_end_of_the_stage(corpus, tmp_path):
    manifest = corpus({"s1": ["neutral", "happy", "sad"], "s2": ["sad"]})
    Path(manifest.loc[2, "path"]).unlink()  # gone since the manifest was made
    splits = split_of(manifest, [{"s1": "train", "s2": "test"}])
    out = augment(manifest, splits, out_dir=tmp_path / "aug", chain=CHAIN, copies=1, workers=1, progress=False)
    assert sorted(out["source_id"]) == ["synth/s1/u0", "synth/s1/u1"]
    rejects = pd.read_csv(tmp_path / "aug" / "rejects.csv")
    assert rejects["reason"].tolist() == ["missing"] and "expected the audio" in rejects["detail"][0]


def test_a_failed_rerun_leaves_the_earlier_output_as_it_was(corpus, tmp_path, monkeypatch):
    import pipeline.augment as augment_module

    manifest = corpus()
    splits = split_of(manifest, KFOLD)
    out = tmp_path / "aug"
    augment(manifest, splits, out_dir=out, chain=CHAIN, copies=1, seed=0, workers=1, progress=False)
    (out / "NOTES.txt").write_text("mine")  # not the stage's: carried into every new output
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real, calls = augment_module._augment_source, []

    def failing_midway(task):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C or a kill midway
        return real(task)

    monkeypatch.setattr(augment_module, "_augment_source", failing_midway)
    with pytest.raises(KeyboardInterrupt):
        augment(manifest, splits, out_dir=out, chain=CHAIN, copies=1, seed=1, workers=1, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # no seed-1 copy over a seed-0 one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aug", "corpus"]  # no staging folder left
    monkeypatch.undo()
    augment(manifest, splits, out_dir=out, chain=CHAIN, copies=1, seed=1, workers=1, progress=False)
    assert (out / "NOTES.txt").read_text() == "mine"


def test_an_out_folder_holding_other_things_is_refused_and_all_sources_missing_keeps_the_output(corpus, tmp_path):
    manifest = corpus()
    splits = split_of(manifest, KFOLD)
    with pytest.raises(ValueError, match="found source audio inside it"):  # --out the corpus folder
        augment(manifest, splits, out_dir=tmp_path / "corpus", chain=CHAIN, copies=1, progress=False)
    (tmp_path / "other" / "store").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"expected an earlier output of this stage.*\['store'\]"):
        augment(manifest, splits, out_dir=tmp_path / "other", chain=CHAIN, copies=1, progress=False)
    assert (tmp_path / "other" / "store").is_dir()
    backup = tmp_path / "backup"  # a manifest.csv alone does not make a folder this stage's output
    (backup / "runs" / "rf").mkdir(parents=True)
    manifest.to_csv(backup / "manifest.csv", index=False)
    (backup / "runs" / "rf" / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="expected an earlier output of this stage"):
        augment(manifest, splits, out_dir=backup, chain=CHAIN, copies=1, progress=False)
    assert (backup / "runs" / "rf" / "metrics.json").is_file()
    out = tmp_path / "aug"
    augment(manifest, splits, out_dir=out, chain=CHAIN, copies=1, workers=1, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    gone = manifest.assign(path=[str(tmp_path / "unmounted" / Path(p).name) for p in manifest["path"]])
    with pytest.raises(ValueError, match=r"all 9 sources rejected \(9 missing.*holds what it held before"):
        augment(gone, splits, out_dir=out, chain=CHAIN, copies=1, workers=1, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_out_folder_holding_the_inputs_is_refused(corpus, tmp_path, capsys):
    manifest = corpus()
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    split_of(manifest, KFOLD).to_csv(tmp_path / "splits.csv", index=False)
    assert main(["--manifest", str(tmp_path / "manifest.csv"), "--split", str(tmp_path / "splits.csv"),
                 "--out", str(tmp_path)]) == 2
    assert "would delete" in capsys.readouterr().err and (tmp_path / "manifest.csv").is_file()


def test_split_ids_missing_from_the_manifest_are_refused(corpus, tmp_path):
    manifest = corpus({"s1": ["neutral"], "s2": ["sad"]})
    splits = split_of(manifest, [{"s1": "train", "s2": "test"}])
    with pytest.raises(ValueError, match="not in the manifest"):
        augment(manifest.iloc[1:], splits, out_dir=tmp_path / "aug", chain=CHAIN, workers=1)


def test_every_copy_differs_and_describes_what_was_drawn(write_audio, tmp_path):
    x = sf.read(write_audio(tmp_path / "a.wav", seconds=0.5))[0].astype(np.float32)
    rare = build_chain({"time_stretch": {"p": 0.1}})
    for k in range(10):
        y, description = augment_one(x, rare, seed=copy_seed(0, "a", k))
        assert description.startswith("time_stretch(rate=") and len(y) != len(x)
    loud = build_chain({"gain": {"p": 1.0, "min_gain_db": 30.0, "max_gain_db": 30.0}})
    y, description = augment_one(x, loud, seed=0)
    assert np.max(np.abs(y)) == pytest.approx(0.999, abs=1e-6)
    assert description.startswith("gain(gain_db=30); limit(gain_db=-")


def test_placement_adds_copies_where_their_source_trains_and_guards_leaks(corpus):
    manifest = corpus()
    splits = split_of(manifest, KFOLD)
    copies = pd.DataFrame({"id": ["synth/s1/u0_aug0", "synth/s3/u1_aug0", "synth/s3/u1_aug1"],
                           "source_id": ["synth/s1/u0", "synth/s3/u1", "synth/s3/u1"],
                           "speaker": ["s1", "s3", "s3"]})
    placed = place_augmented(splits, copies)
    added = placed.iloc[len(splits):]
    assert sorted(map(tuple, added.to_numpy())) == [(0, "synth/s1/u0_aug0", "train"),
                                                    (1, "synth/s3/u1_aug0", "train"),
                                                    (1, "synth/s3/u1_aug1", "train")]
    pd.testing.assert_frame_equal(place_augmented(placed, copies), placed)
    check_speaker_independent(placed, pd.concat([manifest, copies]))

    in_test = pd.concat([splits, pd.DataFrame([(0, "synth/s3/u1_aug0", "test")], columns=splits.columns)])
    with pytest.raises(ValueError, match=r"validation or test partition, e\.g\. \['synth/s3/u1_aug0'\]"):
        place_augmented(in_test, copies)
    beside_test = pd.concat([splits, pd.DataFrame([(1, "synth/s1/u0_aug0", "train")], columns=splits.columns)])
    with pytest.raises(ValueError, match=r"source is not in training, e\.g\. \['synth/s1/u0_aug0'\]"):
        place_augmented(beside_test, copies)


def test_real_ravdess_files(ravdess_root, tmp_path):
    files = sorted((ravdess_root / "Actor_01").glob("*.flac"))[:3] + sorted(
        (ravdess_root / "Actor_02").glob("*.flac"))[:2]
    emotions = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
                "07": "disgust", "08": "surprised"}
    manifest = pd.DataFrame([[f"ravdess/{f.parent.name}/{f.stem}", str(f), "ravdess", f"ravdess_{f.stem[-2:]}",
                              "male" if int(f.stem[-2:]) % 2 else "female", emotions[f.stem.split("-")[2]],
                              sf.info(str(f)).duration, 16000, 1] for f in files], columns=COLUMNS)
    splits = split_of(manifest, [{"ravdess_01": "train", "ravdess_02": "test"}])
    out = augment(manifest, splits, out_dir=tmp_path / "aug", chain=CHAIN, copies=1, workers=2, progress=False)
    assert sorted(out["source_id"]) == sorted(manifest["id"][:3])
    assert (out["speaker"] == "ravdess_01").all()
    for row in out.itertuples():
        x, rate = sf.read(row.path)
        assert rate == 16000 and np.isfinite(x).all() and np.max(np.abs(x)) > 0.01
        assert 0.85 < row.duration_s / manifest.set_index("id").loc[row.source_id, "duration_s"] < 1.15


def test_copies_of_sources_outside_the_split_are_refused():
    splits = pd.DataFrame({"fold": [0], "id": ["c/a"], "partition": ["train"]})
    copies = pd.DataFrame({"id": ["c/b_aug0"], "source_id": ["c/b"]})
    with pytest.raises(ValueError, match="absent from the split"):
        place_augmented(splits, copies)


def test_a_manifest_with_a_repeated_row_is_a_clear_error(corpus, tmp_path, capsys):
    manifest = corpus({"s1": ["neutral", "happy"], "s2": ["sad"]})
    pd.concat([manifest, manifest.iloc[:1]]).to_csv(tmp_path / "manifest.csv", index=False)
    split_of(manifest, [{"s1": "train", "s2": "test"}]).to_csv(tmp_path / "splits.csv", index=False)
    assert main(["--manifest", str(tmp_path / "manifest.csv"), "--split", str(tmp_path / "splits.csv"),
                 "--out", str(tmp_path / "aug"), "--copies", "1", "--workers", "1", "--balance", "false"]) == 2
    assert "expected unique ids across the manifests, found 1 repeated" in capsys.readouterr().err
