"""Stage extract: exactness, append-only and resumable builds, stores per settings, bad audio, CLI."""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from features import extract as extract_mod
from features.encoder import Encoder, StridedMatmulFeatureEncoder
from features.extract import extract, main
from features.store import FeatureStore, scan_shard
from pipeline.audio import load_audio


@pytest.fixture
def forward_calls(monkeypatch):
    """Record the input lengths (samples) of every encoder forward pass."""
    calls = []
    original = Encoder.forward

    def spy(self, batch, **kw):
        calls.append([len(w) for w in batch])
        return original(self, batch, **kw)

    monkeypatch.setattr(Encoder, "forward", spy)
    return calls


def _ravdess_manifest(ravdess_root, tmp_path, manifest_rows):
    files = sorted((ravdess_root / "Actor_01").glob("*.flac"))[:4] + sorted((ravdess_root / "Actor_02").glob("*.flac"))[:2]
    rows = manifest_rows(files, corpus="ravdess")
    dup = rows.iloc[[0]].assign(id=rows["id"].iloc[0] + "-copy")  # same length as row 0
    path = tmp_path / "manifest.csv"
    pd.concat([rows, dup]).to_csv(path, index=False)
    return path, pd.concat([rows, dup])


def _files_state(root):
    """(inode, mtime) of every file below ``root``."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def _shards(out):
    return sorted(out.glob("*/shards/*.h5"))


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("storage", [torch.float16, torch.float32])
def test_cast_and_pool_keeps_its_input_and_pools_like_float64(compute, storage):
    states = (torch.randn(3, 37, 16, generator=torch.Generator().manual_seed(0)) * 4 + 2).to(compute)
    before = states.clone()
    frames, pooled = extract_mod.cast_and_pool(states, storage)
    assert torch.equal(states, before)
    assert frames.dtype == storage and torch.equal(frames, before.to(storage))
    x = before.double()
    want = torch.cat([x.mean(1), x.std(1, correction=0)], dim=-1)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("storage, rtol, procs", [("float16", 2e-3, 1), ("float32", 1e-5, 2)])
def test_cached_frames_equal_direct_forward_on_ravdess(ravdess_root, tiny_encoder_dir, direct_forward, tmp_path,
                                                       forward_calls, manifest_rows, storage, rtol, procs):
    manifest, rows = _ravdess_manifest(ravdess_root, tmp_path, manifest_rows)
    assert rows["duration_s"].nunique() >= 4  # mixed lengths
    summary = extract([manifest], tmp_path / "f", encoder=str(tiny_encoder_dir), device="cpu", dtype="float32",
                      storage_dtype=storage, procs=procs, part_entries=3, tail_alone=0)
    assert summary["computed"] == len(rows) and summary["skipped"] == 0
    if procs == 1:  # (worker processes' calls are not seen by the spy)
        # inputs of different lengths shared a pass (their frames are checked exact below)
        assert any(len(set(lengths)) > 1 for lengths in forward_calls)
    with FeatureStore(tmp_path / "f") as fs:
        assert sorted(fs.ids()) == sorted(rows["id"]) and fs.num_layers == 4
        assert fs.attrs["storage_dtype"] == storage and fs.attrs["kind"] == "wav2vec2"
        assert fs.attrs["device"] == "cpu" and fs.attrs["provenance"]["cpu"]
        assert fs.attrs["provenance"]["host"] == platform.node()  # the machine that computed the shard
        for row in rows.itertuples():
            want = direct_forward(load_audio(row.path, sample_rate=16000))
            assert fs.num_frames(row.id) == want.shape[1]
            for layer in range(fs.num_layers):
                got = fs.frames(row.id, layer)
                scale = np.abs(want[layer]).max()
                np.testing.assert_allclose(got, want[layer], rtol=rtol, atol=rtol * scale)
            np.testing.assert_allclose(fs.pooled(row.id)[:, :32], want.mean(1), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(fs.pooled(row.id)[:, 32:], want.std(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("procs", [1, 2])
def test_data2vec_rows_of_different_frame_counts_never_share_a_pass(tiny_model_dir, synth_files, make_manifest,
                                                                     tmp_path, forward_calls, procs):
    from transformers import AutoModel

    model_dir = tiny_model_dir("data2vec-audio-base")
    extract([make_manifest(synth_files)], tmp_path / "f", encoder=str(model_dir), device="cpu", dtype="float32",
            procs=procs, tail_alone=0)
    model = AutoModel.from_pretrained(model_dir).eval()
    from features.encoder import load_encoder
    enc = load_encoder(model_dir, device="cpu", dtype="float32")
    for lengths in forward_calls:
        assert len({enc.num_frames(n) for n in lengths}) == 1
    with FeatureStore(tmp_path / "f") as fs:
        assert len(fs) == len(synth_files)
        for path in synth_files:
            uid = f"synth/{path.parent.name}/{path.stem}"
            x = torch.from_numpy(enc.normalise(load_audio(path, sample_rate=16000)))[None]
            with torch.no_grad():
                want = torch.stack(model(x, output_hidden_states=True).hidden_states, 1)[0].numpy()
            got = fs.all_frames(uid)
            assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()


def test_append_only_reuse_add_change(synth_files, make_manifest, tiny_encoder_dir, tmp_path, forward_calls,
                                      write_audio):
    out = tmp_path / "f"
    kw = {"encoder": str(tiny_encoder_dir), "device": "cpu", "dtype": "float32", "procs": 1}
    first = extract([make_manifest(synth_files[:4])], out, **kw)
    assert first["computed"] == 4
    before = {u: FeatureStore(out).frames(u, 2) for u in FeatureStore(out).ids()}
    forward_calls.clear()
    state = _files_state(out)
    again = extract([make_manifest(synth_files[:4])], out, **kw)
    assert again == {**again, "computed": 0, "reused": 4, "removed": 0} and forward_calls == []
    assert _files_state(out) == state  # a rerun writes nothing
    shards = {p: state[p] for p in _shards(out)}
    more = extract([make_manifest(synth_files)], out, **kw)
    assert (more["computed"], more["reused"], more["stored"]) == (2, 4, 6)
    assert {p: _files_state(out)[p] for p in shards} == shards  # existing shards untouched (inode, mtime)
    write_audio(synth_files[0], seconds=0.9, seed=99)  # same path and id, new content
    changed = extract([make_manifest(synth_files[:3])], out, **kw)
    assert (changed["computed"], changed["reused"], changed["removed"], changed["stored"]) == (1, 2, 3, 3)
    with FeatureStore(out) as fs:
        assert len(fs) == 3
        kept = [u for u in fs.ids() if u.endswith("u1")][0]
        np.testing.assert_array_equal(fs.frames(kept, 2), before[kept])


def test_switching_settings_back_and_forth_recomputes_nothing(synth_files, make_manifest, tiny_model_dir,
                                                              tmp_path):
    out, manifest = tmp_path / "f", make_manifest(synth_files[:3])
    a, b = str(tiny_model_dir("wav2vec2-base")), str(tiny_model_dir("hubert-base"))
    kw = {"device": "cpu", "dtype": "float32"}
    assert extract([manifest], out, encoder=a, **kw)["computed"] == 3
    assert extract([manifest], out, encoder=b, **kw)["computed"] == 3
    with FeatureStore(out) as fs:
        assert fs.attrs["model_type"] == "hubert"
    third = extract([manifest], out, encoder=a, **kw)
    assert (third["computed"], third["reused"]) == (0, 3)
    parent = Path(a).parent  # the same folder spelt otherwise: one store (a path is kept as given, normalised)
    for spelling in (a + "/", a + "/.", f"{parent}/../{parent.name}/{Path(a).name}"):
        again = extract([manifest], out, encoder=spelling, **kw)
        assert (again["computed"], again["reused"]) == (0, 3)
    with FeatureStore(out) as fs:
        assert fs.attrs["encoder"] == a
    for change in [{"max_seconds": 0.5}, {"layers": "0,2"}, {"dtype": "bfloat16"}]:
        summary = extract([manifest], out, encoder=a, **{**kw, **change})
        assert summary["computed"] == 3 and summary["reused"] == 0
    assert len([d for d in out.iterdir() if d.is_dir()]) == 5  # one store per identity, side by side
    with FeatureStore(out) as fs:
        assert fs.attrs["dtype"] == "bfloat16" and fs.num_layers == 3


def test_bad_audio_is_reported_not_dropped(synth_files, make_manifest, tiny_encoder_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.wav").write_bytes(b"")
    (bad / "garbage.wav").write_bytes(b"RIFF not really audio" * 20)
    sf.write(bad / "short.wav", np.full(100, 0.1, np.float32), 16000)
    sf.write(bad / "nan.wav", np.array([0.1, np.nan] * 4000, np.float32), 16000, subtype="FLOAT")
    paths = synth_files[:2] + sorted(bad.iterdir()) + [bad / "missing.wav"]
    skips = tmp_path / "skips.csv"
    summary = extract([make_manifest(paths)], tmp_path / "f", encoder=str(tiny_encoder_dir), device="cpu",
                      skips=skips)
    assert (summary["computed"], summary["skipped"], summary["stored"]) == (2, 5, 2)
    report = pd.read_csv(skips).set_index("id")["reason"].to_dict()
    assert report == {"synth/bad/empty": "empty", "synth/bad/garbage": "unreadable", "synth/bad/short": "too_short",
                      "synth/bad/nan": "non_finite", "synth/bad/missing": "missing"}


def test_a_manifest_whose_every_row_is_skipped_leaves_the_view_as_it_was(synth_files, make_manifest,
                                                                         tiny_encoder_dir, tmp_path):
    out, kw = tmp_path / "f", {"encoder": str(tiny_encoder_dir), "device": "cpu"}
    assert extract([make_manifest(synth_files[:2])], out, **kw)["stored"] == 2
    before = (out / "current.json").read_bytes()
    unmounted = make_manifest([tmp_path / "not-mounted" / p.name for p in synth_files[:2]], name="gone.csv")
    with pytest.raises(ValueError, match=r"all 2 skipped \(2 missing.*left as it was.*mounted"):
        extract([unmounted], out, **kw)
    assert (out / "current.json").read_bytes() == before
    assert pd.read_csv(f"{out}.skips.csv")["reason"].tolist() == ["missing", "missing"]
    with FeatureStore(out) as fs:
        assert len(fs) == 2


def test_empty_and_repeated_manifests_and_bad_options(tmp_path, make_manifest, synth_files, tiny_encoder_dir,
                                                      capsys):
    empty = tmp_path / "empty.csv"
    pd.DataFrame(columns=["id", "path", "duration_s"]).to_csv(empty, index=False)
    main(["--manifest", str(empty), "--manifest", str(make_manifest(synth_files[:1])), "--out",
          str(tmp_path / "f"), "--encoder", str(tiny_encoder_dir), "--device", "cpu", "--layers", "1,2"])
    with FeatureStore(tmp_path / "f") as fs:
        assert len(fs) == 1 and fs.attrs["layers"] == [1, 2]
    assert (tmp_path / "f.skips.csv").read_text().strip() == "id,path,reason,detail"
    main(["--manifest", str(empty), "--out", str(tmp_path / "e"), "--encoder", str(tiny_encoder_dir)])
    with FeatureStore(tmp_path / "e") as fs:
        assert fs.ids() == []
    twice = make_manifest(synth_files[:1], name="again.csv")
    with pytest.raises(ValueError, match="unique ids"):
        extract([twice, twice], tmp_path / "f", encoder=str(tiny_encoder_dir))
    for layers in ["0,9", "0,0", "x"]:
        with pytest.raises(ValueError, match="--layers"):
            extract([twice], tmp_path / "f", encoder=str(tiny_encoder_dir), layers=layers)
    for option, value in [("--batch-seconds", "0"), ("--procs", "-1"), ("--max-seconds", "-5"),
                          ("--offset-seconds", "-1"), ("--chunk-seconds", "x"), ("--device", "gpu"),
                          ("--device", "cuda:x"), ("--layers", "x"), ("--layers", "0,0"), ("--layers", "-1")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--manifest", str(twice), "--out", str(tmp_path / "g"), option, value])
        assert exit_info.value.code == 2 and option in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_long_file_is_streamed_in_windows(tmp_path, write_audio, make_manifest, tiny_encoder_dir, forward_calls):
    long = write_audio(tmp_path / "long" / "a.wav", seconds=9.0)
    extract([make_manifest([long])], tmp_path / "f", encoder=str(tiny_encoder_dir), device="cpu",
            chunk_seconds=1.0, procs=1, feature_encoder="library")  # (no start-up timing passes)
    assert len(forward_calls) == 9 and max(max(c) for c in forward_calls) < 6 * 16000
    with FeatureStore(tmp_path / "f") as fs:
        assert fs.num_frames("synth/long/a") == 450 and fs.attrs["chunk_seconds"] == 1.0


def test_long_files_amid_short_ones_in_one_process_equal_worker_processes(tmp_path, write_audio, make_manifest,
                                                                         tiny_encoder_dir):
    # one process writes on a background thread; a long file's windows must still be computed on the thread that
    # runs the other passes (the encoder collects each pass's hidden states in one place)
    files = [write_audio(tmp_path / "a" / f"s{i % 3}" / f"long{i}.wav", seconds=7.0 + i, seed=i) for i in range(3)]
    files += [write_audio(tmp_path / "a" / f"s{i % 3}" / f"u{i:02d}.wav", seconds=1.0 + 0.1 * i, seed=10 + i)
              for i in range(12)]
    manifest = make_manifest(files)
    kw = {"encoder": str(tiny_encoder_dir), "device": "cpu", "dtype": "float32", "chunk_seconds": 1.0,
          "feature_encoder": "library", "max_batch": 2}
    extract([manifest], tmp_path / "one", procs=1, **kw)
    extract([manifest], tmp_path / "two", procs=2, **kw)
    with FeatureStore(tmp_path / "one") as one, FeatureStore(tmp_path / "two") as two:
        assert sorted(one.ids()) == sorted(two.ids()) and len(one) == 15
        for uid in one.ids():
            np.testing.assert_array_equal(one.all_frames(uid), two.all_frames(uid), err_msg=uid)
            np.testing.assert_array_equal(one.pooled(uid), two.pooled(uid), err_msg=uid)


def test_pipelined_passes_store_the_same_and_keep_the_pass_before_a_failure(tmp_path, write_audio, make_manifest,
                                                                             tiny_encoder_dir, monkeypatch):
    # on CUDA a pass's results are collected after the next pass is queued; forced here on CPU
    files = [write_audio(tmp_path / "a" / f"s{i % 3}" / f"u{i:02d}.wav", seconds=1.0 + 0.3 * i, seed=i)
             for i in range(8)]
    files.append(write_audio(tmp_path / "a" / "s0" / "long.wav", seconds=5.0, seed=99))  # windowed
    manifest = make_manifest(files)
    kw = {"encoder": str(tiny_encoder_dir), "device": "cpu", "dtype": "float32", "chunk_seconds": 1.0,
          "feature_encoder": "library", "max_batch": 2, "procs": 1, "part_entries": 1}
    extract([manifest], tmp_path / "plain", **kw)
    encode = extract_mod.encode_rows
    monkeypatch.setattr(extract_mod, "encode_rows", lambda *a, **k: encode(*a, **k, pipelined=True))
    extract([manifest], tmp_path / "pipelined", **kw)
    with FeatureStore(tmp_path / "plain") as plain, FeatureStore(tmp_path / "pipelined") as piped:
        assert sorted(plain.ids()) == sorted(piped.ids()) and len(plain) == 9
        for uid in plain.ids():
            np.testing.assert_array_equal(plain.all_frames(uid), piped.all_frames(uid), err_msg=uid)
            np.testing.assert_array_equal(plain.pooled(uid), piped.pooled(uid), err_msg=uid)
    forward, calls = extract_mod.forward_split, []

    def third_pass_fails(enc, waves, layers):
        calls.append(len(waves))
        if len(calls) == 3:
            raise OSError("the device failed")
        return forward(enc, waves, layers)

    monkeypatch.setattr(extract_mod, "forward_split", third_pass_fails)
    with pytest.raises(OSError, match="the device failed"):
        extract([manifest], tmp_path / "failed", **kw)
    monkeypatch.setattr(extract_mod, "forward_split", forward)
    resumed = extract([manifest], tmp_path / "failed", **kw)
    # kept: the long file (longest first, windowed without forward_split) and both passes before the failing one,
    # the last of them still pending when the failure came
    assert resumed["reused"] == 1 + sum(calls[:2]) and resumed["computed"] == 9 - 1 - sum(calls[:2])


def test_a_rerun_computes_no_pass_whose_only_row_to_do_cannot_be_decoded(tmp_path, write_audio, make_manifest,
                                                                        tiny_encoder_dir, forward_calls):
    good = write_audio(tmp_path / "a" / "s1" / "good.wav", seconds=1.0)  # one pass with the bad row (1 s listed)
    bad = tmp_path / "a" / "s1" / "bad.wav"
    bad.write_bytes(b"RIFF and then nothing an audio decoder can read")
    manifest = make_manifest([good, bad])
    kw = {"encoder": str(tiny_encoder_dir), "device": "cpu", "dtype": "float32", "procs": 1,
          "feature_encoder": "library", "tail_alone": 0}
    first = extract([manifest], tmp_path / "f", **kw)
    assert (first["computed"], first["skipped"]) == (1, 1) and len(forward_calls) == 1
    again = extract([manifest], tmp_path / "f", **kw)
    assert (again["computed"], again["skipped"]) == (0, 1)
    assert len(forward_calls) == 1  # the good row's pass was not run again for nothing


def test_killed_run_resumes_to_the_same_store(tmp_path, write_audio, make_manifest, tiny_encoder_dir):
    files = [write_audio(tmp_path / "a" / f"s{i % 3}" / f"u{i:02d}.wav", seconds=1.0 + 0.05 * i, seed=i)
             for i in range(24)]
    manifest = make_manifest(files)
    out = tmp_path / "killed" / "f"
    cmd = [sys.executable, "-m", "features.extract", "--manifest", str(manifest), "--out", str(out), "--encoder",
           str(tiny_encoder_dir), "--device", "cpu", "--dtype", "float32", "--part-entries", "1",
           "--feature-encoder", "library"]  # two independent stores: the same implementation, bit for bit
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(_shards(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "current.json").exists(), "the run finished before it could be killed"
    n_shards = len(_shards(out))
    assert 3 <= n_shards < 24
    published = {p: _files_state(out)[p] for p in _shards(out)}
    resumed = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    reused = int(re.search(r"(\d+) reused", resumed).group(1))
    assert reused >= n_shards and f"{24 - reused} computed" in resumed
    assert {p: _files_state(out)[p] for p in published} == published  # the killed run's shards kept as they were
    assert not list(out.rglob("*.tmp-*"))  # no debris
    clean = tmp_path / "clean"
    subprocess.run([*cmd[:cmd.index("--out") + 1], str(clean), *cmd[cmd.index("--out") + 2:]], check=True,
                   capture_output=True)
    with FeatureStore(out) as a, FeatureStore(clean) as b:
        assert sorted(a.ids()) == sorted(b.ids()) and len(a) == 24
        for uid in a.ids():
            np.testing.assert_array_equal(a.all_frames(uid), b.all_frames(uid))
            np.testing.assert_array_equal(a.pooled(uid), b.pooled(uid))


def test_a_failed_write_stops_the_run_and_keeps_the_previous_view(synth_files, make_manifest, tiny_encoder_dir,
                                                                  tmp_path, monkeypatch):
    out = tmp_path / "f"
    kw = {"encoder": str(tiny_encoder_dir), "device": "cpu", "procs": 1}
    extract([make_manifest(synth_files[:2])], out, **kw)
    view = (out / "current.json").read_bytes()

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("features.cache.PartWriter.add", disk_full)
    with pytest.raises(OSError, match="No space left"):
        extract([make_manifest(synth_files)], out, **kw)
    monkeypatch.undo()
    assert (out / "current.json").read_bytes() == view
    with FeatureStore(out) as fs:
        assert len(fs) == 2
    assert extract([make_manifest(synth_files)], out, **kw)["computed"] == 4


def test_versions_and_provenance_recorded(tiny_encoder_dir):
    from features.encoder import load_encoder

    assert {"torch", "transformers", "numpy", "h5py"} <= set(extract_mod.versions())
    enc = load_encoder(tiny_encoder_dir, device="cpu")
    record = extract_mod.provenance(enc, procs=2)
    assert record["feature_encoder"] == enc.feature_encoder and record["cpu"] and record["procs"] == 2
    assert record["feature_encoder_timing"]["chosen"] == enc.feature_encoder
    assert record["frame_grid"] == enc.frame_grid == record["feature_encoder_timing"]["frame_grid"]
    enc.use_feature_encoder("strided_matmul")
    assert extract_mod.provenance(enc, procs=1)["feature_encoder_version"] == StridedMatmulFeatureEncoder.version
    enc.use_feature_encoder("library")
    assert extract_mod.provenance(enc, procs=1)["feature_encoder_version"] is None


def test_an_extended_store_keeps_the_implementation_and_frame_grid_it_began_with(synth_files, make_manifest,
                                                                                  tiny_encoder_dir, tmp_path,
                                                                                  monkeypatch):
    def chosen(enc):
        enc.use_feature_encoder("strided_matmul")
        enc.use_frame_grid(8)
        enc.feature_encoder_timing = {"chosen": "strided_matmul", "frame_grid": 8}

    out, kw = tmp_path / "f", {"encoder": str(tiny_encoder_dir), "device": "cpu", "dtype": "float32", "procs": 1}
    monkeypatch.setattr(extract_mod, "choose_feature_encoder", chosen)
    assert extract([make_manifest(synth_files[:3])], out, **kw)["computed"] == 3
    monkeypatch.setattr(extract_mod, "choose_feature_encoder", lambda enc: pytest.fail("timed again"))
    assert extract([make_manifest(synth_files)], out, **kw)["computed"] == 3
    with FeatureStore(out) as fs:
        record = fs.attrs["provenance"]
    assert (record["feature_encoder"], record["frame_grid"]) == ("strided_matmul", 8)
    assert record["feature_encoder_timing"]["kept_from"]


def test_extending_a_store_made_by_another_plugin_version_says_so(synth_files, make_manifest, tiny_encoder_dir,
                                                                  tmp_path, monkeypatch, capsys):
    def chosen(enc):
        enc.use_feature_encoder("strided_matmul")
        enc.feature_encoder_timing = {"chosen": "strided_matmul", "frame_grid": 1}

    out, kw = tmp_path / "f", {"encoder": str(tiny_encoder_dir), "device": "cpu", "dtype": "float32", "procs": 1}
    monkeypatch.setattr(extract_mod, "choose_feature_encoder", chosen)
    old = StridedMatmulFeatureEncoder.version
    extract([make_manifest(synth_files[:2])], out, **kw)
    assert "computed by the strided_matmul plug-in" not in capsys.readouterr().out
    monkeypatch.setattr(StridedMatmulFeatureEncoder, "version", old + 1)  # as if the plug-in changed since
    assert extract([make_manifest(synth_files)], out, **kw)["computed"] == len(synth_files) - 2
    said = capsys.readouterr().out
    assert f"strided_matmul plug-in at version {old}; this code runs version {old + 1}" in said
    with FeatureStore(out) as fs:
        assert fs.attrs["provenance"]["feature_encoder_version"] == old + 1  # the newest shard's own


def test_passes_are_planned_over_every_row_and_split_longest_first(tiny_encoder_dir):
    from features.encoder import load_encoder
    from features.extract import Job, plan_batches, split_tasks

    enc = load_encoder(tiny_encoder_dir, device="cpu")
    seconds = [3.0, 2.9, 2.95, 2.8, 2.0, 1.95, 60.0, float("nan"), 2.85, 1.0]
    rows = pd.DataFrame({"id": [f"u{i}" for i in range(10)], "path": "p", "source": "s", "duration_s": seconds})
    job = Job(layers=[0], max_batch=3, max_padding=0.1)
    everything = plan_batches(rows, set(rows["id"]), job, enc)
    ids = [[r["id"] for r in b] for b in everything]
    assert ids == [["u6"], ["u0", "u2", "u1"], ["u8", "u3"], ["u4", "u5"], ["u9"], ["u7"]]  # long, nan alone
    # a resumed run plans the same passes and keeps those with work, computed whole
    resumed = plan_batches(rows, {"u1", "u9"}, job, enc)
    assert [[r["id"] for r in b] for b in resumed] == [["u0", "u2", "u1"], ["u9"]]
    assert [r["todo"] for r in resumed[0]] == [False, False, True]
    tasks = split_tasks(everything, procs=2, most=16)
    assert [b for t in tasks for b in t] == everything and len(tasks) >= 3
    assert all(len(t) == 1 for t in tasks[-2:])  # the work shrinks to single passes at the end
    # the shortest rows run alone, so that the processes finish together
    tail = plan_batches(rows, set(rows["id"]), replace(job, tail_alone=3), enc)
    assert [[r["id"] for r in b] for b in tail] == [["u6"], ["u0", "u2", "u1"], ["u8", "u3"], ["u4"], ["u5"],
                                                    ["u9"], ["u7"]]


def test_decoding_runs_two_passes_ahead_and_long_files_one_ahead(tiny_encoder_dir, monkeypatch):
    from features.encoder import load_encoder
    from features.extract import Job, decoded, plan_batches

    started = []
    monkeypatch.setattr(extract_mod, "_decode", lambda path, *a: started.append(path) or np.zeros(1, np.float32))
    enc = load_encoder(tiny_encoder_dir, device="cpu")
    job = Job(layers=[0], max_batch=4, batch_seconds=10.0)  # two passes: 16 rows (the least) or 20 s

    def most_ahead(seconds: list[float]) -> int:
        rows = pd.DataFrame({"id": [f"u{i:02d}" for i in range(len(seconds))], "source": "s", "duration_s": seconds})
        rows["path"] = rows["id"]
        flat = [r for b in plan_batches(rows, set(rows["id"]), job, enc) for r in b]
        ahead = []
        for done, (row, _wave, err) in enumerate(decoded(flat, enc, job), start=1):
            assert err is None and row["path"] == started[done - 1]  # in order
            seen = -1
            while seen != len(started):  # until the decoding thread has gone as far ahead as it may
                seen = len(started)
                time.sleep(0.02)
            ahead.append(len(started) - done)
        started.clear()
        return max(ahead)

    assert most_ahead([1.0] * 24) == 16
    assert most_ahead([2.5] * 24) == 8
    assert most_ahead([3600.0] * 4) == 1  # an hour is 230 MB decoded: one is held ahead, not sixteen
    assert most_ahead([float("nan")] * 4) == 1  # unknown lengths count as the whole budget


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB filesystem (tmpfs), where the platform lets this test mount one; skips elsewhere."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({done.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("procs", [1, 2])
def test_a_disk_that_fills_during_the_run_ends_in_a_clear_error_and_resumes(
        small_disk, tmp_path, write_audio, make_manifest, tiny_model_dir, monkeypatch, capsys, procs):
    files = [write_audio(tmp_path / "a" / f"u{i:02d}.wav", seconds=3.0, seed=i) for i in range(30)]
    manifest, out = make_manifest(files), small_disk / "f"
    model = str(tiny_model_dir("wav2vec2-base"))
    args = ["--manifest", str(manifest), "--out", str(out), "--encoder", model, "--device", "cpu",
            "--storage-dtype", "float32", "--part-entries", "4", "--procs", str(procs)]
    assert main(args) == 1  # refused before any work: the estimate does not fit
    assert "free for 90 s of audio" in capsys.readouterr().err and not _shards(out)
    monkeypatch.setattr(extract_mod, "check_free_space", lambda *a: None)  # as if the disk filled meanwhile
    assert main(args) == 1
    assert "is full" in capsys.readouterr().err
    kept = _shards(out)
    assert kept and not list(out.rglob("*.tmp-*"))  # whole shards only
    big = tmp_path / "moved"
    subprocess.run(["cp", "-r", str(out), str(big)], check=True)
    summary = extract([manifest], big, encoder=model, device="cpu", storage_dtype="float32", procs=procs)
    assert summary["reused"] == sum(len(scan_shard(p)) for p in kept) > 0 and summary["stored"] == 30


def test_a_collection_keeps_the_dtype_auto_chose_for_it(synth_files, make_manifest, tiny_encoder_dir, tmp_path,
                                                         monkeypatch):
    from features import encoder as encoder_mod

    def timing_says(chosen):  # what a timing on this machine would choose, wherever the choice is made
        for module in (encoder_mod, extract_mod):
            monkeypatch.setattr(module, "pick_dtype", lambda dtype, device: chosen if dtype == "auto" else dtype)

    manifest, out = make_manifest(synth_files[:2]), tmp_path / "f"
    kw = {"encoder": str(tiny_encoder_dir), "device": "cpu", "procs": 1}
    timing_says("bfloat16")
    assert extract([manifest], out, **kw)["computed"] == 2
    timing_says("float32")
    again = extract([manifest], out, **kw)  # a new timing would say float32: the collection keeps bfloat16
    assert (again["computed"], again["reused"]) == (0, 2)
    with FeatureStore(out) as fs:
        assert fs.attrs["dtype"] == "bfloat16" and fs.attrs["provenance"]["dtype_requested"] == "auto"
    assert extract([manifest], out, dtype="float32", **kw)["computed"] == 2  # asked for explicitly: its own store


def test_device_option_names_a_gpu_by_index():
    from features.hardware import device_arg

    assert [device_arg(d) for d in ("auto", "cpu", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]
