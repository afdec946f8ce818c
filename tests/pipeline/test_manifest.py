import json
import os

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from pipeline.manifest import build_manifest, main, scan_corpus


def _reasons(rejects):
    return {p.split("/")[-1]: r for p, r in zip(rejects["path"], rejects["reason"], strict=True)}


def test_bad_ravdess_files_become_rejects(tmp_path, write_audio):
    """One good file beside corrupt, empty, silent, NaN, misnamed and song files: one row, six rejects."""
    actor = tmp_path / "ravdess" / "Actor_01"
    write_audio(actor / "03-01-05-01-01-01-01.wav")
    (actor / "03-01-05-01-01-02-01.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 4)
    (actor / "03-01-05-01-02-01-01.wav").write_bytes(b"")
    sf.write(str(actor / "03-01-05-01-02-02-01.wav"), np.zeros(16000, np.int16), 16000, subtype="PCM_16")
    nan = np.full(16000, 0.1, np.float32)
    nan[500] = np.nan
    sf.write(str(actor / "03-01-05-02-01-01-01.wav"), nan, 16000, subtype="FLOAT")
    write_audio(actor / "speech_angry_take2.wav")
    write_audio(actor / "03-02-05-01-01-01-01.wav")  # song
    write_audio(actor / "02-01-05-01-01-01-01.wav")  # video-only
    write_audio(actor / "04-01-05-01-01-01-01.wav")  # no such modality
    write_audio(actor / "03-01-01-02-01-01-01.wav")  # neutral was never recorded at strong intensity
    write_audio(actor / "03-01-05-01-01-01-０１.wav")  # full-width digits: not actor 01 under another name
    out, rejects_csv = tmp_path / "m.csv", tmp_path / "r.csv"
    assert main(["--corpus", "ravdess", "--root", str(tmp_path / "ravdess"), "--out", str(out),
                 "--rejects", str(rejects_csv)]) == 0
    manifest, rejects = pd.read_csv(out), pd.read_csv(rejects_csv)
    assert list(manifest.columns[:9]) == ["id", "path", "corpus", "speaker", "gender", "emotion", "duration_s",
                                          "sample_rate", "channels"]  # the documented contract
    assert manifest["id"].tolist() == ["ravdess/Actor_01/03-01-05-01-01-01-01"]
    assert manifest.loc[0, "emotion"] == "angry" and manifest.loc[0, "gender"] == "male"
    assert _reasons(rejects) == {
        "03-01-05-01-01-02-01.wav": "unreadable", "03-01-05-01-02-01-01.wav": "empty",
        "03-01-05-01-02-02-01.wav": "silent", "03-01-05-02-01-01-01.wav": "non_finite",
        "speech_angry_take2.wav": "bad_name", "03-02-05-01-01-01-01.wav": "not_speech",
        "02-01-05-01-01-01-01.wav": "not_speech", "04-01-05-01-01-01-01.wav": "bad_name",
        "03-01-01-02-01-01-01.wav": "bad_name", "03-01-05-01-01-01-０１.wav": "bad_name"}
    assert rejects["detail"].notna().all()


def test_truncated_flac_is_corrupt(tmp_path, write_audio):
    good = write_audio(tmp_path / "ravdess" / "03-01-02-01-01-01-02.flac", seconds=6.0, subtype="PCM_16")
    bad = tmp_path / "ravdess" / "03-01-02-01-01-02-02.flac"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    manifest, rejects = scan_corpus("ravdess", tmp_path / "ravdess", progress=False)
    assert len(manifest) == 1
    assert rejects["reason"].tolist() in (["corrupt"], ["unreadable"])


@pytest.mark.parametrize("rate", [16000, 22050, 24414, 44100, 48000, 96000])
def test_sample_rates_and_stereo_recorded(tmp_path, write_audio, rate):
    write_audio(tmp_path / "r" / "03-01-01-01-01-01-03.wav", sample_rate=rate, channels=2, seconds=0.4)
    manifest, _ = scan_corpus("ravdess", tmp_path / "r", progress=False)
    row = manifest.iloc[0]
    assert (row.sample_rate, row.channels) == (rate, 2)
    assert row.duration_s == pytest.approx(0.4, abs=1e-4)


def test_every_corpus_convention(tmp_path, write_audio):
    files = {
        "cremad": ["AudioWAV/1001_DFA_ANG_XX.wav", "AudioWAV/1002_IEO_hap_hi.WAV", "AudioWAV/1091_TIE_NEU_XX.wav"],
        "tess": ["TESS Toronto emotional speech set data/OAF_angry/OAF_back_angry.wav",
                 "TESS Toronto emotional speech set data/YAF_pleasant_surprised/YAF_bean_ps.wav",
                 "x/YAF_fear/yaf_chair_FEAR.wav"],
        "savee": ["AudioData/DC/a01.wav", "ALL/JK_sa15.wav", "AudioData/KL/su03.wav"],
        "emodb": ["wav/03a01Wa.wav", "wav/16b10Lb.wav", "wav/08a02Ac.wav"],
    }
    for corpus, names in files.items():
        for name in names:
            write_audio(tmp_path / corpus / name)
    (tmp_path / "cremad" / "VideoDemographics.csv").write_text(
        "ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,Caucasian,Not Hispanic\n1002,21,Female,Caucasian,Not Hispanic\n")
    expected = {
        "cremad": [("cremad_1001", "male", "angry"), ("cremad_1002", "female", "happy"),
                   ("cremad_1091", "unknown", "neutral")],
        "tess": [("tess_OAF", "female", "angry"), ("tess_YAF", "female", "fearful"), ("tess_YAF", "female", "surprised")],
        "savee": [("savee_JK", "male", "sad"), ("savee_DC", "male", "angry"), ("savee_KL", "male", "surprised")],
        "emodb": [("emodb_03", "male", "angry"), ("emodb_08", "female", "fearful"), ("emodb_16", "female", "boredom")],
    }
    for corpus, rows in expected.items():
        manifest, rejects = scan_corpus(corpus, tmp_path / corpus, progress=False)
        got = sorted(zip(manifest.speaker, manifest.gender, manifest.emotion, strict=True))
        assert got == sorted(rows), corpus
        assert manifest["id"].str.startswith(f"{corpus}/").all()
        assert len(rejects) == (1 if corpus == "cremad" else 0)  # the demographics CSV is listed, not hidden
        written = build_manifest({corpus: tmp_path / corpus}, progress=False)[0]
        assert list(written.columns[:11]) == ["id", "path", "corpus", "speaker", "gender", "emotion", "duration_s",
                                              "sample_rate", "channels", "text", "intensity"]  # as documented


def test_nested_duplicate_copy_is_rejected(tmp_path, write_audio):
    """Archives that hold the corpus twice (as some mirrors do) give each utterance once."""
    for top in ("Actor_01", "audio_speech_actors_01-24/Actor_01"):
        write_audio(tmp_path / "r" / top / "03-01-03-01-01-01-01.wav")
    write_audio(tmp_path / "r" / "Actor_01" / "03-01-03-01-01-01-01 (copy).wav")  # a renamed copy
    manifest, rejects = scan_corpus("ravdess", tmp_path / "r", progress=False)
    assert manifest["id"].tolist() == ["ravdess/Actor_01/03-01-03-01-01-01-01"]
    assert rejects["reason"].tolist() == ["bad_name", "duplicate"]


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="no usable ravdess utterance"):
        scan_corpus("ravdess", tmp_path / "r", progress=False)
    assert main(["--corpus", "ravdess", "--root", str(tmp_path / "r"), "--out", str(tmp_path / "m.csv")]) == 2


def test_unknown_corpus_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus"):
        scan_corpus("iemocap", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        scan_corpus("tess", tmp_path / "absent")


def test_sources_json_joins_corpora(tmp_path, write_audio, ravdess_dir):
    write_audio(tmp_path / "emodb" / "wav" / "03a01Na.wav")
    sources = tmp_path / "corpora.json"
    sources.write_text(json.dumps({"ravdess": {"root": str(ravdess_dir(actors=(1,)))},
                                   "emodb": {"root": str(tmp_path / "emodb")}}))
    out = tmp_path / "m.csv"
    assert main(["--sources", str(sources), "--out", str(out)]) == 0
    manifest = pd.read_csv(out)
    assert manifest.groupby("corpus").size().to_dict() == {"emodb": 1, "ravdess": 8}
    assert (tmp_path / "m_rejects.csv").exists()


def test_real_ravdess(ravdess_root, tmp_path):
    out, rejects = tmp_path / "m.csv", tmp_path / "r.csv"
    assert main(["--corpus", "ravdess", "--root", str(ravdess_root), "--out", str(out), "--rejects", str(rejects)]) == 0
    manifest = pd.read_csv(out)
    assert len(manifest) == 1440 and manifest["id"].is_unique
    assert manifest["speaker"].nunique() == 24
    assert manifest.drop_duplicates("speaker")["gender"].value_counts().to_dict() == {"male": 12, "female": 12}
    counts = manifest["emotion"].value_counts()
    assert counts["neutral"] == 96 and (counts.drop("neutral") == 192).all() and len(counts) == 8
    assert (manifest["channels"] == 2).sum() == 5
    assert len(pd.read_csv(rejects)) == 0


# --- what the walk could not list, truncated and too short files -------------------------------------------

def _ravdess(root, actors=(1, 2)):
    """Paths of one utterance per speaker."""
    return [root / f"Actor_{a:02d}" / f"03-01-05-01-01-01-{a:02d}.wav" for a in actors]


@pytest.fixture
def two_actors(tmp_path, write_audio):
    root = tmp_path / "ravdess"
    for path in _ravdess(root):
        write_audio(path)
    return root


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their permissions")
def test_unreadable_folder_is_a_reject_not_a_lost_speaker(two_actors):
    folder = two_actors / "Actor_02"
    folder.chmod(0)
    try:
        manifest, rejects = scan_corpus("ravdess", two_actors, progress=False)
    finally:
        folder.chmod(0o755)
    assert manifest["speaker"].tolist() == ["ravdess_01"]
    assert rejects[["path", "reason"]].values.tolist() == [[str(folder), "unreadable_folder"]]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_a_reject(two_actors):
    path = two_actors / "Actor_02" / "03-01-05-01-01-01-02.wav"
    path.chmod(0)
    try:
        _, rejects = scan_corpus("ravdess", two_actors, progress=False)
    finally:
        path.chmod(0o644)
    assert rejects["reason"].tolist() == ["unreadable"] and "permission" in rejects.loc[0, "detail"]


def test_directory_symlink_is_followed_once(tmp_path, write_audio):
    root = tmp_path / "ravdess"
    [one] = _ravdess(root, actors=(1,))
    write_audio(one)
    [elsewhere] = _ravdess(tmp_path / "elsewhere", actors=(3,))
    write_audio(elsewhere)
    (root / "Actor_03").symlink_to(elsewhere.parent, target_is_directory=True)
    (root / "Actor_01" / "loop").symlink_to(root, target_is_directory=True)  # back to an ancestor
    manifest, rejects = scan_corpus("ravdess", root, progress=False)
    assert manifest["speaker"].tolist() == ["ravdess_01", "ravdess_03"]
    assert manifest["id"].tolist()[1] == "ravdess/Actor_03/03-01-05-01-01-01-03"
    assert rejects[["path", "reason"]].values.tolist() == [["Actor_01/loop", "link_loop"]]  # relative, as the rest


def test_dangling_and_looping_file_links_are_rejects(two_actors):
    folder = two_actors / "Actor_01"
    (folder / "03-01-06-01-01-01-01.wav").symlink_to(two_actors / "gone.wav")
    (folder / "03-01-07-01-01-01-01.wav").symlink_to(folder / "03-01-07-01-01-01-01.wav")
    manifest, rejects = scan_corpus("ravdess", two_actors, progress=False)
    assert len(manifest) == 2
    assert _reasons(rejects) == {"03-01-06-01-01-01-01.wav": "dangling_link",
                                 "03-01-07-01-01-01-01.wav": "link_loop"}
    assert "gone.wav" in rejects["detail"].iloc[0]


def test_names_that_are_not_utf8_are_rejects_not_a_crash(two_actors, tmp_path):
    good = two_actors / "Actor_01" / "03-01-05-01-01-01-01.wav"
    folder = os.fsencode(two_actors / "Actor_01")
    with open(folder + b"/03-01-06-01-01-01-01\xff.wav", "wb") as f:  # conforming but for one byte
        f.write(good.read_bytes())
    os.mkdir(os.fsencode(two_actors) + b"/Actor_\xfe")
    out, rejects_csv = tmp_path / "m.csv", tmp_path / "r.csv"
    assert main(["--corpus", "ravdess", "--root", str(two_actors), "--out", str(out),
                 "--rejects", str(rejects_csv)]) == 0
    rejects = pd.read_csv(rejects_csv)
    assert len(pd.read_csv(out)) == 2 and rejects["reason"].tolist() == ["bad_name", "bad_name"]
    assert rejects["path"].tolist() == ["Actor_01/03-01-06-01-01-01-01\\xff.wav", "Actor_\\xfe"]
    assert all("not valid UTF-8" in d for d in rejects["detail"])
    below = os.fsencode(tmp_path) + b"/corpus_\xff"  # a root whose own path is not UTF-8: refused, with a way out
    os.rename(os.fsencode(two_actors), below)
    with pytest.raises(ValueError, match="corpus_\\\\xff: its path is not valid UTF-8"):
        scan_corpus("ravdess", os.fsdecode(below), progress=False)


def test_truncated_wav_is_rejected_not_kept_at_part_of_its_length(two_actors):
    path = two_actors / "Actor_02" / "03-01-05-01-01-01-02.wav"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert sf.info(str(path)).frames > 0  # libsndfile alone would read the half that is there
    manifest, rejects = scan_corpus("ravdess", two_actors, progress=False)
    assert manifest["speaker"].tolist() == ["ravdess_01"]
    assert rejects["reason"].tolist() == ["truncated"] and "header announces" in rejects.loc[0, "detail"]


def test_clip_under_the_minimum_duration_is_rejected_as_too_short(two_actors, write_audio, tmp_path):
    write_audio(two_actors / "Actor_02" / "03-01-06-01-01-01-02.wav", seconds=0.05)
    out, rejects_csv = tmp_path / "m.csv", tmp_path / "r.csv"
    assert main(["--corpus", "ravdess", "--root", str(two_actors), "--out", str(out),
                 "--rejects", str(rejects_csv)]) == 0
    rejects = pd.read_csv(rejects_csv)
    assert len(pd.read_csv(out)) == 2 and rejects["reason"].tolist() == ["too_short"]
    assert main(["--corpus", "ravdess", "--root", str(two_actors), "--out", str(out), "--min-seconds", "0.01"]) == 0
    assert len(pd.read_csv(out)) == 3


def test_a_corpus_named_twice_or_a_bad_sources_file_is_refused(tmp_path, capsys):
    args = ["--corpus", "ravdess", "--root", str(tmp_path / "a"), "--corpus", "ravdess", "--root", str(tmp_path / "b")]
    with pytest.raises(SystemExit):  # a dict of roots used to keep the second silently
        main([*args, "--out", str(tmp_path / "m.csv")])
    assert "named more than once" in capsys.readouterr().err
    (tmp_path / "sources.json").write_text('{"ravdess": {"url": "x"}}')
    with pytest.raises(SystemExit):
        main(["--sources", str(tmp_path / "sources.json"), "--out", str(tmp_path / "m.csv")])
    assert "expected the JSON pipeline.pull writes" in capsys.readouterr().err
    assert not (tmp_path / "m.csv").exists()


def test_one_file_under_two_names_is_a_counted_duplicate_not_two_labels(two_actors):
    first = sorted((two_actors / "Actor_01").glob("*.wav"))[0]
    parts = first.stem.split("-")
    parts[2] = "04" if parts[2] != "04" else "03"  # another emotion code
    (first.parent / f"{'-'.join(parts)}.wav").symlink_to(first)
    manifest, rejects = scan_corpus("ravdess", two_actors, progress=False)
    row = rejects[rejects["reason"] == "duplicate"]
    assert len(row) == 1 and "the same file (a link) as" in row["detail"].iloc[0]
    assert manifest["path"].map(lambda p: (two_actors / p).resolve()).is_unique
    assert first.relative_to(two_actors).as_posix() in manifest["path"].tolist()  # the file itself, its own label


def test_cremad_names_outside_its_sentences_are_rejects_and_level_x_is_xx(tmp_path, write_audio, capsys):
    for name in ("1001_DFA_ANG_XX.wav", "1001_DFA_ANG_X.wav", "1001_ZZZ_ANG_XX.wav"):
        write_audio(tmp_path / "c" / "AudioWAV" / name)
    manifest, rejects = scan_corpus("cremad", tmp_path / "c", progress=False)
    assert "holds no VideoDemographics.csv" in capsys.readouterr().err  # genders unknown: said
    assert manifest["gender"].tolist() == ["unknown"]
    assert len(manifest) == 1 and manifest["intensity"].tolist() == ["unspecified"]  # X and XX: one utterance
    assert sorted(rejects["reason"]) == ["bad_name", "duplicate"]
    assert rejects.set_index("reason").loc["bad_name", "path"].endswith("1001_ZZZ_ANG_XX.wav")


def test_emodb_texts_and_savee_sentences_outside_the_corpora_are_rejects(tmp_path, write_audio):
    for name in ("03a01Wa.wav", "03b99Wa.wav", "03a03Wa.wav"):
        write_audio(tmp_path / "e" / "wav" / name)
    manifest, rejects = scan_corpus("emodb", tmp_path / "e", progress=False)
    assert len(manifest) == 1 and _reasons(rejects) == {"03b99Wa.wav": "bad_name", "03a03Wa.wav": "bad_name"}
    for name in ("DC_n30.wav", "DC_n31.wav", "DC_a15.wav", "DC_a16.wav"):
        write_audio(tmp_path / "s" / name)
    manifest, rejects = scan_corpus("savee", tmp_path / "s", progress=False)
    assert sorted(manifest["text"]) == ["a15", "n30"]
    assert _reasons(rejects) == {"DC_n31.wav": "bad_name", "DC_a16.wav": "bad_name"}
