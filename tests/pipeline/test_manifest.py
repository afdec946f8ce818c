import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from pipeline.manifest import COLUMNS, main, scan_corpus


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
    out, rejects_csv = tmp_path / "m.csv", tmp_path / "r.csv"
    assert main(["--corpus", "ravdess", "--root", str(tmp_path / "ravdess"), "--out", str(out),
                 "--rejects", str(rejects_csv)]) == 0
    manifest, rejects = pd.read_csv(out), pd.read_csv(rejects_csv)
    assert list(manifest.columns[:len(COLUMNS)]) == COLUMNS
    assert manifest["id"].tolist() == ["ravdess/Actor_01/03-01-05-01-01-01-01"]
    assert manifest.loc[0, "emotion"] == "angry" and manifest.loc[0, "gender"] == "male"
    assert _reasons(rejects) == {
        "03-01-05-01-01-02-01.wav": "unreadable", "03-01-05-01-02-01-01.wav": "empty",
        "03-01-05-01-02-02-01.wav": "silent", "03-01-05-02-01-01-01.wav": "non_finite",
        "speech_angry_take2.wav": "bad_name", "03-02-05-01-01-01-01.wav": "not_speech",
        "02-01-05-01-01-01-01.wav": "not_speech"}
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
