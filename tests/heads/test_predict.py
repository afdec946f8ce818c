"""heads.predict: whole-file and timeline predictions from run directories, formats, plots and bad inputs.

Two runs are trained once per module on synthetic data through the real trainers: a linear head over the
tiny random wav2vec2's hidden states, and a RandomForest over eGeMAPS functionals.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from features.encoder import load_encoder
from features.store import write_store
from heads.predict import main, predict_file
from inference.model import Predictor
from inference.timeline import weighted_mean
from pipeline.audio import load_audio
from training.fit import TrainConfig
from training.rundir import load_run

LABELS = ["neutral", "happy", "sad", "angry"]  # label set "four"
F0 = {"neutral": 110.0, "happy": 260.0, "sad": 150.0, "angry": 200.0}
SPEAKERS = [f"syn_{i}" for i in range(6)]


def tone(seconds: float, f0: float, seed: int, rate: int = 16000) -> np.ndarray:
    """Harmonics of a wobbling f0 with a syllable envelope and a little noise, ``[N]``."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 5)) * (0.55 - 0.45 * np.cos(2 * np.pi * 4 * t))
    return (0.2 * x + 0.005 * rng.standard_normal(len(t))).astype(np.float32)


def synthetic_experiment(root, features):
    """Manifest, 3-fold speaker split and a store of ``features(wave) -> (frames [L, T, H], pooled)``."""
    rows, entries = [], {}
    for s, speaker in enumerate(SPEAKERS):
        for emotion in LABELS:
            for k in range(2):
                uid = f"syn/{speaker}/{emotion}_{k}"
                entries[uid] = features(tone(1.0, F0[emotion] * (1 + 0.03 * s), seed=s * 10 + k))
                rows.append({"id": uid, "path": f"/nonexistent/{uid}.wav", "corpus": "syn", "speaker": speaker,
                             "gender": "male", "emotion": emotion, "duration_s": 1.0, "sample_rate": 16000,
                             "channels": 1})
    manifest = pd.DataFrame(rows)
    manifest.to_csv(root / "manifest.csv", index=False)
    split = []
    for fold in range(3):
        for uid, speaker in zip(manifest["id"], manifest["speaker"], strict=True):
            group = SPEAKERS.index(speaker) // 2
            split.append((fold, uid, "test" if group == fold else "val" if group == (fold + 1) % 3 else "train"))
    pd.DataFrame(split, columns=["fold", "id", "partition"]).to_csv(root / "splits.csv", index=False)
    (root / "splits.json").write_text(json.dumps({"scheme": "speaker_kfold", "speaker_independent": True,
                                                  "n_folds": 3, "seed": 0}))
    return entries


@pytest.fixture(scope="module")
def wav2vec2_run(tmp_path_factory, tiny_encoder_dir):
    """A linear head over hidden states 1 and 3 of the tiny encoder, trained with ``heads.train``."""
    from heads.train import train_heads

    root = tmp_path_factory.mktemp("w2v_run")
    enc = load_encoder(tiny_encoder_dir, device="cpu", dtype="float32")
    entries = synthetic_experiment(root, lambda w: (enc.hidden_states(w), None))
    write_store(root / "features.h5", entries, {"kind": "wav2vec2", "encoder": str(tiny_encoder_dir),
                                                "revision": enc.revision, "layers": list(range(enc.num_layers))})
    train_heads(features=str(root / "features.h5"), manifests=[str(root / "manifest.csv")],
                split=str(root / "splits.csv"), head="linear", label_set="four", out=str(root / "run"),
                layers=[1, 3], config=TrainConfig(epochs=4, patience=0, batch_size=8))
    return root / "run"


@pytest.fixture(scope="module")
def egemaps_run(tmp_path_factory):
    """A RandomForest over eGeMAPS functionals, trained with ``baselines.train``."""
    from baselines.train import train_sklearn
    from features.egemaps import egemaps_features

    root = tmp_path_factory.mktemp("egemaps_run")

    def features(wave):
        functionals, llds = egemaps_features(wave, 16000)
        return llds[None], functionals[None]

    write_store(root / "features.h5", synthetic_experiment(root, features),
                {"kind": "egemaps", "encoder": "opensmile/eGeMAPSv02", "layers": [0]})
    train_sklearn(features=str(root / "features.h5"), manifests=[str(root / "manifest.csv")],
                  split=str(root / "splits.csv"), model="rf", label_set="four", out=str(root / "run"),
                  settings={"n_estimators": 20})
    return root / "run"


def run_cli(capsys, *argv):
    """``main(argv)`` -> (exit status, stdout, stderr)."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def check_probabilities(entry):
    p = entry["probabilities"]
    assert list(p) == LABELS
    assert sum(p.values()) == pytest.approx(1.0, abs=1e-5)
    assert entry["label"] == max(p, key=p.get)


# --- a wav2vec2 head run ---------------------------------------------------------------------------------

def test_whole_file_json_from_stereo_44k(wav2vec2_run, write_audio, tmp_path, capsys):
    path = write_audio(tmp_path / "clip.flac", seconds=2.0, sample_rate=44100, channels=2)
    status, out, _ = run_cli(capsys, path, "--model", wav2vec2_run, "--device", "cpu")
    assert status == 0
    [entry] = json.loads(out)
    assert entry["file"] == str(path) and entry["label_from"] == "whole" and "segments" not in entry
    assert entry["duration_s"] == pytest.approx(2.0)
    check_probabilities(entry)


def test_prediction_equals_run_on_extracted_features(wav2vec2_run, tiny_encoder_dir, write_audio, tmp_path,
                                                     capsys):
    path = write_audio(tmp_path / "clip.wav", seconds=1.5)
    status, out, _ = run_cli(capsys, path, "--model", wav2vec2_run)
    run = Predictor.from_run(load_run(wav2vec2_run))
    wave = sf.read(str(path), dtype="float32")[0]
    frames = load_encoder(tiny_encoder_dir, device="cpu", dtype="float32").hidden_states(wave)  # every layer, as the store
    expected = run.predict_proba([frames])[0]
    got = json.loads(out)[0]["probabilities"]
    np.testing.assert_allclose([got[k] for k in LABELS], expected, atol=1e-5)


def test_prediction_crops_as_the_runs_store_cropped(wav2vec2_run, tiny_encoder_dir, write_audio, tmp_path, capsys):
    run = shutil.copytree(wav2vec2_run, tmp_path / "run")
    for config in (run / "models").glob("fold_*.json"):  # as if extracted with --offset-seconds 0.5 --max-seconds 1
        cfg = json.loads(config.read_text())
        cfg["feature_settings"].update(offset_seconds=0.5, max_seconds=1.0)
        config.write_text(json.dumps(cfg))
    path = write_audio(tmp_path / "clip.wav", seconds=3.0)
    status, out, _ = run_cli(capsys, path, "--model", run)
    wave = sf.read(str(path), dtype="float32")[0]
    encoder = load_encoder(tiny_encoder_dir, device="cpu", dtype="float32")
    predictor = Predictor.from_run(load_run(run))
    expected = predictor.predict_proba([encoder.hidden_states(wave[8000:24000])])[0]
    got = json.loads(out)[0]["probabilities"]
    np.testing.assert_allclose([got[k] for k in LABELS], expected, atol=1e-5)
    # a 44.1 kHz stereo file is cropped at its own rate, then resampled: as features.extract read it
    stereo = tmp_path / "stereo.flac"
    rng = np.random.default_rng(0)
    sf.write(str(stereo), rng.uniform(-0.3, 0.3, (3 * 44100, 2)).astype(np.float32), 44100)
    status, out, _ = run_cli(capsys, stereo, "--model", run, "--segment-seconds", "0.5")
    extracted = load_audio(stereo, sample_rate=16000, offset_s=0.5, duration_s=1.0)  # features.extract's read
    expected = predictor.predict_proba([encoder.hidden_states(extracted)])[0]
    entry = json.loads(out)[0]
    np.testing.assert_allclose([entry["probabilities"][k] for k in LABELS], expected, atol=1e-5)
    # timeline windows are windows of the whole file, not cropped again
    assert status == 0 and len(entry["segments"]) == 6 and all(s["label"] for s in entry["segments"])
    # a crop that falls on leading silence is classified, as the store held such crops
    late = tmp_path / "late.wav"
    sf.write(str(late), np.concatenate([np.zeros(24000), rng.uniform(-0.3, 0.3, 24000)]).astype(np.float32), 16000)
    status, out, _ = run_cli(capsys, late, "--model", run)
    assert status == 0 and json.loads(out)[0]["label"] in LABELS


def test_features_are_computed_as_the_store_recorded_them_without_a_new_timing(wav2vec2_run, tmp_path,
                                                                            monkeypatch):
    import features.encoder
    from inference.inputs import run_inputs

    run = shutil.copytree(wav2vec2_run, tmp_path / "run")
    for config in (run / "models").glob("fold_*.json"):  # as if extraction had chosen the plug-in and a grid
        cfg = json.loads(config.read_text())
        cfg["feature_settings"].setdefault("provenance", {}).update(feature_encoder="strided_matmul", frame_grid=8)
        config.write_text(json.dumps(cfg))

    def no_timing(enc, **kw):
        raise AssertionError("prediction must not time the feature encoder again")

    monkeypatch.setattr(features.encoder, "choose_feature_encoder", no_timing)
    inputs = run_inputs(Predictor.from_run(load_run(run)), device="cpu")
    assert "feature encoder strided_matmul, frame grid 8" in inputs.description


def test_prediction_warns_when_the_plugin_changed_since_extraction(wav2vec2_run, tmp_path, capsys):
    from features.encoder import StridedMatmulFeatureEncoder
    from inference.inputs import run_inputs

    run = shutil.copytree(wav2vec2_run, tmp_path / "run")
    current = StridedMatmulFeatureEncoder.version
    for version, warned in ((current, False), (current - 1, True), (None, True)):
        for config in (run / "models").glob("fold_*.json"):
            cfg = json.loads(config.read_text())
            cfg["feature_settings"].setdefault("provenance", {}).update(feature_encoder="strided_matmul",
                                                                        feature_encoder_version=version)
            if version is None:
                del cfg["feature_settings"]["provenance"]["feature_encoder_version"]
            config.write_text(json.dumps(cfg))
        run_inputs(Predictor.from_run(load_run(run)), device="cpu")
        err = capsys.readouterr().err
        assert ("warning: the store's features were computed by the strided_matmul plug-in" in err) == warned
        if warned:
            assert ("an unrecorded version" if version is None else f"version {version};") in err


def test_timeline_segments_and_plot(wav2vec2_run, write_audio, tmp_path, capsys):
    path = write_audio(tmp_path / "ten.wav", seconds=10.0, sample_rate=22050)
    plot = tmp_path / "timeline.png"
    status, out, err = run_cli(capsys, path, "--model", wav2vec2_run, "--segment-seconds", 3,
                               "--plot", plot, "--verbose")
    assert status == 0
    [entry] = json.loads(out)
    assert [(s["start"], s["end"]) for s in entry["segments"]] == [(0.0, 3.0), (3.0, 6.0), (6.0, 10.0)]
    for seg in entry["segments"]:
        check_probabilities(seg)
    check_probabilities(entry)
    assert entry["label_from"] == "whole"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    assert "real-time factor" in err


def test_hop_and_file_shorter_than_a_segment(wav2vec2_run, write_audio, tmp_path, capsys):
    long = write_audio(tmp_path / "five.wav", seconds=5.0)
    short = write_audio(tmp_path / "short.wav", seconds=1.2)
    status, out, _ = run_cli(capsys, long, short, "--model", wav2vec2_run, "--segment-seconds", 2,
                             "--hop-seconds", 1)
    assert status == 0
    entries = json.loads(out)
    assert [(s["start"], s["end"]) for s in entries[0]["segments"]] == [(0, 2), (1, 3), (2, 4), (3, 5)]
    assert [(s["start"], s["end"]) for s in entries[1]["segments"]] == [(0.0, 1.2)]
    check_probabilities(entries[1]["segments"][0])


def test_long_file_is_streamed_and_labelled_from_segments(wav2vec2_run, write_audio, tmp_path, monkeypatch):
    import heads.predict as predict
    from inference.inputs import run_inputs

    def no_whole_load(*args, **kwargs):
        raise AssertionError("a long file must be streamed, not loaded whole")

    monkeypatch.setattr(predict, "load_audio", no_whole_load)
    path = write_audio(tmp_path / "long.wav", seconds=8.8, sample_rate=8000)
    predictor = Predictor.from_run(load_run(wav2vec2_run))
    result = predict_file(str(path), predictor=predictor, inputs=run_inputs(predictor, device="cpu"), segment_seconds=2.0,
                          max_whole_seconds=4.0, batch_size=3, block_seconds=1.3)
    assert result["label_from"] == "segments"
    segs = result["segments"]
    assert [(s["start"], s["end"]) for s in segs] == [(0, 2), (2, 4), (4, 6), (6, 8.8)]  # 0.8 s tail joined
    expected = weighted_mean(np.array([[s["probabilities"][k] for k in LABELS] for s in segs]),
                             [s["end"] - s["start"] for s in segs])
    np.testing.assert_allclose([result["probabilities"][k] for k in LABELS], expected, atol=1e-5)
    check_probabilities(result)


def test_digital_silence_inside_a_file_is_not_classified(wav2vec2_run, tmp_path, capsys):
    x = tone(9.0, 180.0, seed=1)
    x[3 * 16000:6 * 16000] = 0.0
    path = tmp_path / "gap.wav"
    sf.write(str(path), x, 16000, subtype="PCM_16")
    status, out, _ = run_cli(capsys, path, "--model", wav2vec2_run, "--segment-seconds", 3)
    assert status == 0
    segs = json.loads(out)[0]["segments"]
    assert segs[1] == {"start": 3.0, "end": 6.0, "label": None, "probabilities": None, "silent": True}
    check_probabilities(segs[0])
    check_probabilities(segs[2])


def test_plot_draws_silent_segments_instead_of_crashing(wav2vec2_run, tmp_path, capsys):
    x = tone(9.0, 180.0, seed=1)
    x[3 * 16000:6 * 16000] = 0.0
    path, plot = tmp_path / "gap.wav", tmp_path / "gap.png"
    sf.write(str(path), x, 16000, subtype="PCM_16")
    status, out, err = run_cli(capsys, path, "--model", wav2vec2_run, "--segment-seconds", 3, "--plot", plot)
    assert status == 0 and "Traceback" not in err
    assert json.loads(out)[0]["segments"][1]["silent"] is True
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_a_folder_given_as_file_is_named_as_such(wav2vec2_run, write_audio, tmp_path, capsys):
    good = write_audio(tmp_path / "good.wav", seconds=1.0)
    status, out, _ = run_cli(capsys, tmp_path, good, "--model", wav2vec2_run)
    [folder, ok] = json.loads(out)
    assert status == 1 and folder["reason"] == "folder" and "is a folder; expected an audio file" in folder["error"]
    check_probabilities(ok)


def test_bad_inputs_are_per_file_errors(wav2vec2_run, write_audio, tmp_path, capsys):
    good = write_audio(tmp_path / "good.wav", seconds=1.0)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF....WAVEjunk" * 8)
    silent = tmp_path / "silent.wav"
    sf.write(str(silent), np.zeros(16000, dtype=np.float32), 16000, subtype="PCM_16")
    signal = np.random.default_rng(0).uniform(-0.5, 0.5, 16000).astype(np.float32)
    cancelling = tmp_path / "cancelling.wav"  # each channel has signal; their mono mean is zero
    sf.write(str(cancelling), np.stack([signal, -signal], axis=1), 16000, subtype="FLOAT")
    tiny = write_audio(tmp_path / "tiny.wav", seconds=0.1)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.wav"
    cut = write_audio(tmp_path / "cut.wav", seconds=3.0)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a truncated copy: its header says 3 s
    status, out, _ = run_cli(capsys, missing, good, garbage, silent, tiny, empty, cut, cancelling, "--model",
                             wav2vec2_run, "--segment-seconds", 3)
    assert status == 1
    entries = json.loads(out)
    assert [e["file"] for e in entries] == [str(p) for p in (missing, good, garbage, silent, tiny, empty, cut,
                                                              cancelling)]
    assert [e.get("reason") for e in entries] == ["missing", None, "unreadable", "silent", "too_short", "empty",
                                                  "truncated", "silent"]
    assert "channels are averaged to mono" in entries[7]["error"]
    for e in entries:
        assert set(e) == {"file", "error", "reason"} or "error" not in e
    check_probabilities(entries[1])
    assert "expected" in entries[3]["error"]


def test_csv_and_table_formats(wav2vec2_run, write_audio, tmp_path, capsys):
    good = write_audio(tmp_path / "good.wav", seconds=7.0)
    x = tone(9.0, 180.0, seed=1)
    x[3 * 16000:6 * 16000] = 0.0  # the middle segment is digital silence
    gap = tmp_path / "gap.wav"
    sf.write(str(gap), x, 16000, subtype="PCM_16")
    status, out, _ = run_cli(capsys, good, tmp_path / "nope.wav", gap, "--model", wav2vec2_run,
                             "--segment-seconds", 3, "--format", "csv")
    assert status == 1
    rows = pd.read_csv(__import__("io").StringIO(out), keep_default_na=False, dtype=str)
    assert list(rows.columns) == ["file", "segment", "start", "end", "label", *LABELS, "error", "reason",
                                  "label_from", "silent"]
    assert rows["segment"].tolist() == ["", "0", "1", "", "", "0", "1", "2"]  # good + 2 segments, failing, gap + 3
    ok = rows.iloc[[0, 1, 2, 4, 5, 7]]
    np.testing.assert_allclose(ok[LABELS].astype(float).sum(axis=1), 1.0, atol=1e-5)
    assert rows.iloc[3]["error"] and rows.iloc[3]["reason"] == "missing" and rows.iloc[3]["label"] == ""
    assert rows["label_from"].tolist() == ["whole", "", "", "", "whole", "", "", ""]
    assert rows["silent"].tolist() == ["False", "False", "False", "", "False", "False", "True", "False"]
    assert rows.iloc[6]["label"] == "" and (rows.iloc[6][LABELS] == "").all()
    status, out, _ = run_cli(capsys, good, "--model", wav2vec2_run, "--segment-seconds", 3, "--format", "table")
    assert status == 0 and "whole file" in out and out.count("\n") == 5  # header, file, whole, 2 segments
    status, out, _ = run_cli(capsys, tmp_path / "nope.wav", "--model", wav2vec2_run, "--format", "table")
    assert status == 1 and "error (missing)" in out


def test_encoder_location_follows_override_and_env(wav2vec2_run, tiny_encoder_dir, write_audio, tmp_path,
                                                   capsys, monkeypatch):
    moved = tmp_path / "run"
    shutil.copytree(wav2vec2_run, moved)
    for cfg in (moved / "models").glob("fold_*.json"):
        data = json.loads(cfg.read_text())
        data["feature_settings"]["encoder"] = str(tmp_path / "gone")
        cfg.write_text(json.dumps(data))
    path = write_audio(tmp_path / "a.wav", seconds=1.0)
    monkeypatch.delenv("SER_ENCODER", raising=False)
    status, _, err = run_cli(capsys, path, "--model", moved)
    assert status == 2 and "--encoder" in err
    status, out, _ = run_cli(capsys, path, "--model", moved, "--encoder", tiny_encoder_dir)
    assert status == 0
    monkeypatch.setenv("SER_ENCODER", str(tiny_encoder_dir))
    status, out_env, _ = run_cli(capsys, path, "--model", moved)
    assert status == 0 and json.loads(out_env) == json.loads(out)


def test_command_line_mistakes(wav2vec2_run, write_audio, tmp_path, capsys):
    path = write_audio(tmp_path / "a.wav", seconds=1.0)
    (tmp_path / "empty_run").mkdir()
    status, _, err = run_cli(capsys, path, "--model", tmp_path / "empty_run")
    assert status == 2 and "metrics.json not found" in err
    for extra in (["--plot", tmp_path / "p.png"], ["--segment-seconds", 2, "--hop-seconds", 3],
                  ["--segment-seconds", 0.1], ["--batch-size", 0], ["--max-whole-seconds", -1],
                  ["--segment-seconds", 2, "--plot", tmp_path], ["--model", tmp_path / "no_run"]):
        with pytest.raises(SystemExit) as exc:
            main([str(path), "--model", str(wav2vec2_run), *map(str, extra)])
        assert exc.value.code == 2


# --- an eGeMAPS run --------------------------------------------------------------------------------------

def test_egemaps_random_forest_run(egemaps_run, write_audio, tmp_path, capsys):
    path = write_audio(tmp_path / "clip.wav", seconds=7.0, sample_rate=48000, channels=2)
    plot = tmp_path / "egemaps.png"
    status, out, err = run_cli(capsys, path, "--model", egemaps_run, "--segment-seconds", 2.5, "--plot", plot,
                               "--encoder", "ignored")
    assert status == 0 and "--encoder ignored" in err
    [entry] = json.loads(out)
    check_probabilities(entry)
    assert [(s["start"], s["end"]) for s in entry["segments"]] == [(0.0, 2.5), (2.5, 5.0), (5.0, 7.0)]
    for seg in entry["segments"]:
        check_probabilities(seg)
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_egemaps_prediction_clips_loud_float_audio_as_extraction_does_and_says_so(egemaps_run, tmp_path):
    from features.egemaps import egemaps_features
    from inference.inputs import run_inputs
    from inference.model import Predictor
    from training.rundir import load_run

    quiet = tone(3.0, 180.0, seed=2)
    loud = (quiet * (2.5 / np.abs(quiet).max())).astype(np.float32)  # float audio beyond full scale
    inputs = run_inputs(Predictor.from_run(load_run(egemaps_run)), device="cpu")
    with pytest.warns(UserWarning, match="beyond 16-bit full scale were clipped"):
        (got,) = inputs.compute([loud])
    np.testing.assert_array_equal(got[0], egemaps_features(np.clip(loud, -1, 32767 / 32768), 16000)[0])


def test_a_head_run_with_speaker_normalisation_warns_that_answers_differ(wav2vec2_run, tmp_path, capsys):
    from inference.inputs import run_inputs

    run = shutil.copytree(wav2vec2_run, tmp_path / "run")
    run_inputs(Predictor.from_run(load_run(run)), device="cpu")
    assert "speaker normalisation" not in capsys.readouterr().err
    for config in (run / "models").glob("fold_*.json"):
        cfg = json.loads(config.read_text())
        cfg["normalisation"]["mode"] = "speaker"
        config.write_text(json.dumps(cfg))
    run_inputs(Predictor.from_run(load_run(run)), device="cpu")
    assert "was trained with speaker normalisation; here each recording is standardised with its own" \
        in capsys.readouterr().err
