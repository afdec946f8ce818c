"""Stage egemaps: eGeMAPSv02 functionals and LLDs, incremental, bad audio reported."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from features.egemaps import egemaps_features, extract_egemaps
from features.store import FeatureStore


def test_features_of_one_waveform(write_audio, tmp_path):
    wave, rate = sf.read(write_audio(tmp_path / "a.wav", seconds=1.5), dtype="float32")
    f, lld = egemaps_features(wave, rate)
    assert f.shape == (88,) and f.dtype == np.float32 and np.isfinite(f).all()
    assert lld.shape[1] == 25 and abs(lld.shape[0] - 148) <= 3  # one frame per 10 ms
    with pytest.raises(ValueError, match="too short|long enough"):
        egemaps_features(np.full(400, 0.1, np.float32), 16000)


def test_store_on_ravdess_incremental_with_skips(ravdess_root, make_manifest, tmp_path):
    files = sorted((ravdess_root / "Actor_03").glob("*.flac"))[:3]
    sf.write(tmp_path / "tiny.wav", np.full(400, 0.1, np.float32), 16000)
    (tmp_path / "empty.wav").write_bytes(b"")
    manifest = make_manifest(files + [tmp_path / "tiny.wav", tmp_path / "empty.wav"])
    out = tmp_path / "e.h5"
    summary = extract_egemaps([manifest], out, workers=2)
    assert (summary["computed"], summary["skipped"], summary["stored"]) == (3, 2, 3)
    reasons = pd.read_csv(f"{out}.skips.csv").set_index("id")["reason"].to_dict()
    assert reasons == {f"synth/{tmp_path.name}/tiny": "too_short", f"synth/{tmp_path.name}/empty": "empty"}
    with FeatureStore(out) as fs:
        assert fs.attrs["kind"] == "egemaps" and fs.num_layers == 1
        assert len(fs.attrs["functional_names"]) == 88 and len(fs.attrs["lld_names"]) == 25
        provenance = fs.attrs["provenance"]  # what computed it, as extraction records
        assert provenance["device"] == "cpu" and provenance["cpu"] and provenance["host"]
        for uid, path in zip(fs.ids(), sorted(files), strict=True):
            assert fs.pooled(uid).shape == (1, 88) and fs.frames(uid, 0).shape[1] == 25
            wave, rate = sf.read(path, dtype="float32")
            f, lld = egemaps_features(wave, rate)
            np.testing.assert_allclose(fs.pooled(uid)[0], f, rtol=1e-5)
            np.testing.assert_array_equal(fs.frames(uid, 0), lld)
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = extract_egemaps([manifest], out, workers=1)
    assert (again["computed"], again["reused"], again["stored"], again["corrupt"]) == (0, 3, 3, 0)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files  # an append-only store: nothing rewritten
    assert len(list(out.glob("*/shards/*.h5"))) == 1  # one shard of whole utterances


def test_float_audio_beyond_full_scale_is_clipped_and_said_and_nan_audio_skipped(ravdess_root, make_manifest,
                                                                                 tmp_path, capsys):
    """openSMILE reads 16-bit samples: float samples beyond [-1, 1] would wrap into garbage features."""
    wave, rate = sf.read(sorted((ravdess_root / "Actor_03").glob("*.flac"))[0], dtype="float32")
    loud, clipped = tmp_path / "loud.wav", tmp_path / "clipped.wav"
    sf.write(loud, wave * (2.2 / np.abs(wave).max()), rate, subtype="FLOAT")
    sf.write(clipped, np.clip(wave * (2.2 / np.abs(wave).max()), -1, 32767 / 32768), rate, subtype="FLOAT")
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.where(np.arange(len(wave)) % 100 == 0, np.nan, wave).astype(np.float32), rate, subtype="FLOAT")
    out = tmp_path / "e"
    summary = extract_egemaps([make_manifest([loud, clipped, nan])], out, workers=1)
    assert (summary["computed"], summary["skipped"]) == (2, 1)
    assert "1 files have samples beyond 16-bit full scale" in capsys.readouterr().err
    assert pd.read_csv(f"{out}.skips.csv")["reason"].tolist() == ["non_finite"]
    with FeatureStore(out) as fs:
        (loud_id,) = [i for i in fs.ids() if i.endswith("/loud")]
        (clipped_id,) = [i for i in fs.ids() if i.endswith("/clipped")]
        np.testing.assert_array_equal(fs.pooled(loud_id), fs.pooled(clipped_id))  # as its clipped copy
    peak = wave * (1.0 / np.abs(wave).max())  # exactly full scale: openSMILE's truncation would wrap +1.0 to -1.0
    f_peak, _ = egemaps_features(peak, rate)
    np.testing.assert_array_equal(f_peak, egemaps_features(np.clip(peak, -1, 32767 / 32768), rate)[0])
    with pytest.raises(ValueError, match="finite"):  # prediction calls it directly: the same refusal
        egemaps_features(np.where(np.arange(len(wave)) == 5, np.nan, wave), rate)
