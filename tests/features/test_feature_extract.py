"""Stage extract: exactness, incremental and resumable builds, invalidation, bad audio, CLI."""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from features import extract as extract_mod
from features.cache import boot_time
from features.encoder import Encoder
from features.extract import extract, main
from features.store import FeatureStore, replace_synced
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


@pytest.mark.parametrize("storage, rtol, procs", [("float16", 2e-3, 1), ("float32", 1e-5, 2)])
def test_cached_frames_equal_direct_forward_on_ravdess(ravdess_root, tiny_encoder_dir, direct_forward, tmp_path,
                                                       forward_calls, manifest_rows, storage, rtol, procs):
    manifest, rows = _ravdess_manifest(ravdess_root, tmp_path, manifest_rows)
    assert rows["duration_s"].nunique() >= 4  # mixed lengths
    summary = extract([manifest], tmp_path / "f.h5", encoder=str(tiny_encoder_dir), device="cpu",
                      storage_dtype=storage, procs=procs, part_entries=3, tail_alone=0)
    assert summary["computed"] == len(rows) and summary["skipped"] == 0
    if procs == 1:  # (worker processes' calls are not seen by the spy)
        # inputs of different lengths shared a pass (their frames are checked exact below)
        assert any(len(set(lengths)) > 1 for lengths in forward_calls)
    with FeatureStore(tmp_path / "f.h5") as fs:
        assert sorted(fs.ids()) == sorted(rows["id"]) and fs.num_layers == 4
        assert fs.attrs["storage_dtype"] == storage and fs.attrs["kind"] == "wav2vec2"
        for row in rows.itertuples():
            want = direct_forward(load_audio(row.path, sample_rate=16000))
            assert fs.num_frames(row.id) == want.shape[1]
            for layer in range(fs.num_layers):
                got = fs.frames(row.id, layer)
                scale = np.abs(want[layer]).max()
                np.testing.assert_allclose(got, want[layer], rtol=rtol, atol=rtol * scale)
            np.testing.assert_allclose(fs.pooled(row.id)[:, :32], want.mean(1), rtol=1e-4, atol=1e-4)


def test_incremental_reuse_add_remove_change(synth_files, make_manifest, tiny_encoder_dir, tmp_path, forward_calls,
                                             write_audio):
    out = tmp_path / "f.h5"
    kw = {"encoder": str(tiny_encoder_dir), "device": "cpu", "procs": 1}
    first = extract([make_manifest(synth_files[:4])], out, **kw)
    assert first["computed"] == 4
    before = {u: FeatureStore(out).frames(u, 2) for u in FeatureStore(out).ids()}
    forward_calls.clear()
    mtime = out.stat().st_mtime_ns
    again = extract([make_manifest(synth_files[:4])], out, **kw)
    assert again == {**again, "computed": 0, "reused": 4, "removed": 0} and forward_calls == []
    assert out.stat().st_mtime_ns == mtime  # nothing rewritten
    more = extract([make_manifest(synth_files)], out, **kw)
    assert (more["computed"], more["reused"], more["stored"]) == (2, 4, 6)
    write_audio(synth_files[0], seconds=0.9, seed=99)  # same path and id, new content
    changed = extract([make_manifest(synth_files[:3])], out, **kw)
    assert (changed["computed"], changed["reused"], changed["removed"], changed["stored"]) == (1, 2, 3, 3)
    with FeatureStore(out) as fs:
        assert len(fs) == 3
        kept = [u for u in fs.ids() if u.endswith("u1")][0]
        np.testing.assert_array_equal(fs.frames(kept, 2), before[kept])


def test_settings_change_rebuilds_instead_of_mixing(synth_files, make_manifest, tiny_encoder_dir, tmp_path, capsys):
    out, manifest = tmp_path / "f.h5", make_manifest(synth_files[:3])
    extract([manifest], out, encoder=str(tiny_encoder_dir), device="cpu")
    for change in [{"max_seconds": 0.5}, {"dtype": "bfloat16"}, {"layers": "0,3"}]:
        summary = extract([manifest], out, encoder=str(tiny_encoder_dir), device="cpu", **change)
        assert summary["computed"] == 3 and summary["reused"] == 0
        assert "rebuilding" in capsys.readouterr().out
    with FeatureStore(out) as fs:
        assert fs.attrs["layers"] == [0, 3] and fs.attrs["dtype"] == "float32" and fs.num_layers == 2
    summary = extract([manifest], out, encoder=str(tiny_encoder_dir), device="cpu", max_seconds=0.5)
    with FeatureStore(out) as fs:
        assert fs.attrs["max_seconds"] == 0.5 and all(fs.num_frames(u) == 25 for u in fs.ids())


def test_bad_audio_is_reported_not_dropped(synth_files, make_manifest, tiny_encoder_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.wav").write_bytes(b"")
    (bad / "garbage.wav").write_bytes(b"RIFF not really audio" * 20)
    sf.write(bad / "short.wav", np.full(100, 0.1, np.float32), 16000)
    sf.write(bad / "nan.wav", np.array([0.1, np.nan] * 4000, np.float32), 16000, subtype="FLOAT")
    paths = synth_files[:2] + sorted(bad.iterdir()) + [bad / "missing.wav"]
    skips = tmp_path / "skips.csv"
    summary = extract([make_manifest(paths)], tmp_path / "f.h5", encoder=str(tiny_encoder_dir), device="cpu",
                      skips=skips)
    assert (summary["computed"], summary["skipped"], summary["stored"]) == (2, 5, 2)
    report = pd.read_csv(skips).set_index("id")["reason"].to_dict()
    assert report == {"synth/bad/empty": "empty", "synth/bad/garbage": "unreadable", "synth/bad/short": "too_short",
                      "synth/bad/nan": "non_finite", "synth/bad/missing": "missing"}


def test_empty_and_repeated_manifests(tmp_path, make_manifest, synth_files, tiny_encoder_dir):
    empty = tmp_path / "empty.csv"
    pd.DataFrame(columns=["id", "path", "duration_s"]).to_csv(empty, index=False)
    main(["--manifest", str(empty), "--manifest", str(make_manifest(synth_files[:1])), "--out",
          str(tmp_path / "f.h5"), "--encoder", str(tiny_encoder_dir), "--device", "cpu", "--layers", "1,2"])
    with FeatureStore(tmp_path / "f.h5") as fs:
        assert len(fs) == 1 and fs.attrs["layers"] == [1, 2]
    assert (tmp_path / "f.h5.skips.csv").read_text().strip() == "id,path,reason,detail"
    main(["--manifest", str(empty), "--out", str(tmp_path / "e.h5"), "--encoder", str(tiny_encoder_dir)])
    with FeatureStore(tmp_path / "e.h5") as fs:
        assert fs.ids() == []
    twice = make_manifest(synth_files[:1], name="again.csv")
    with pytest.raises(ValueError, match="unique ids"):
        extract([twice, twice], tmp_path / "f.h5", encoder=str(tiny_encoder_dir))
    with pytest.raises(ValueError, match="--layers"):
        extract([twice], tmp_path / "f.h5", encoder=str(tiny_encoder_dir), layers="0,9")


def test_long_file_is_streamed_in_windows(tmp_path, write_audio, make_manifest, tiny_encoder_dir, forward_calls):
    long = write_audio(tmp_path / "long" / "a.wav", seconds=9.0)
    extract([make_manifest([long])], tmp_path / "f.h5", encoder=str(tiny_encoder_dir), device="cpu",
            chunk_seconds=1.0, procs=1)
    assert len(forward_calls) == 9 and max(max(c) for c in forward_calls) < 6 * 16000
    with FeatureStore(tmp_path / "f.h5") as fs:
        assert fs.num_frames("synth/long/a") == 450 and fs.attrs["chunk_seconds"] == 1.0


def test_killed_run_resumes_to_the_same_store(tmp_path, write_audio, make_manifest, tiny_encoder_dir):
    files = [write_audio(tmp_path / "a" / f"s{i % 3}" / f"u{i:02d}.wav", seconds=1.0 + 0.05 * i, seed=i)
             for i in range(24)]
    manifest = make_manifest(files)
    out = tmp_path / "killed" / "f.h5"
    cmd = [sys.executable, "-m", "features.extract", "--manifest", str(manifest), "--out", str(out), "--encoder",
           str(tiny_encoder_dir), "--device", "cpu", "--part-entries", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out.with_name("f.h5.parts")
    deadline = time.monotonic() + 60
    while len(list(parts.glob("part-*.h5"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed"
    n_parts = len(list(parts.glob("part-*.h5")))
    assert 3 <= n_parts < 24
    # each run in a fresh process, as the stage runs (oneDNN caches kernels built for one thread count,
    # so a process that ran the model with other threads before may differ in the last bits)
    resumed = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    reused = int(re.search(r"(\d+) reused", resumed).group(1))
    assert reused >= n_parts and f"{24 - reused} computed" in resumed
    assert sorted(p.name for p in out.parent.iterdir()) == ["f.h5", "f.h5.skips.csv"]  # no parts, no debris
    clean = tmp_path / "clean.h5"
    subprocess.run([*cmd[:cmd.index("--out") + 1], str(clean), *cmd[cmd.index("--out") + 2:]], check=True,
                   capture_output=True)
    with FeatureStore(out) as a, FeatureStore(clean) as b:
        assert a.ids() == b.ids() and len(a) == 24
        for uid in a.ids():
            np.testing.assert_array_equal(a.all_frames(uid), b.all_frames(uid))
            np.testing.assert_array_equal(a.pooled(uid), b.pooled(uid))


def test_kill_during_merge_keeps_old_store(synth_files, make_manifest, tiny_encoder_dir, tmp_path, monkeypatch):
    out = tmp_path / "f.h5"
    kw = {"encoder": str(tiny_encoder_dir), "device": "cpu"}
    extract([make_manifest(synth_files[:2])], out, **kw)

    def killed_before_rename(tmp, target):
        if target != out:
            return replace_synced(tmp, target)  # parts are published as usual
        assert tmp.stat().st_size > 0  # the merged copy was written ...
        raise KeyboardInterrupt         # ... and the process dies before os.replace

    monkeypatch.setattr("features.cache.replace_synced", killed_before_rename)  # as the cache imported it
    with pytest.raises(KeyboardInterrupt):
        extract([make_manifest(synth_files)], out, **kw)
    monkeypatch.undo()
    with FeatureStore(out) as fs:
        assert len(fs) == 2  # the old store, whole
    parts = sorted(out.with_name("f.h5.parts").glob("part-*.h5"))
    assert parts and all(os.stat(p).st_mtime >= boot_time() for p in parts)
    summary = extract([make_manifest(synth_files)], out, **kw)
    assert (summary["computed"], summary["reused"], summary["stored"]) == (0, 6, 6)


def test_unsynced_parts_from_before_a_reboot_are_recomputed(synth_files, make_manifest, tiny_encoder_dir,
                                                             tmp_path, monkeypatch):
    out = tmp_path / "f.h5"
    kw = {"encoder": str(tiny_encoder_dir), "device": "cpu"}
    monkeypatch.setattr("features.cache.StoreBuild.finish", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed after the work, before the merge: parts are left
        extract([make_manifest(synth_files)], out, **kw)
    monkeypatch.undo()
    parts = sorted(out.with_name("f.h5.parts").glob("part-*.h5"))
    assert parts
    os.utime(parts[0], (0, 0))  # as if written before the machine's last boot (a crash may have torn it)
    with FeatureStore(parts[0]) as fs:
        lost = len(fs)
    summary = extract([make_manifest(synth_files)], out, **kw)  # (in this process again: new part names)
    assert (summary["computed"], summary["reused"], summary["stored"]) == (lost, 6 - lost, 6)


def test_versions_recorded():
    assert {"torch", "transformers", "numpy", "h5py"} <= set(extract_mod.versions())


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


_LIBC = """
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
"""

_REUSE_PROBE = _LIBC + """
import resource, sys
if sys.argv[1] == "tuned":
    from features.extract import tune_malloc
    tune_malloc()
size = 64 << 20  # twice the most glibc's mmap threshold may be
block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size); ctypes.memset(block, 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_tuned_malloc_reuses_large_blocks_without_fresh_page_faults(run_probe):
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert run_probe(_REUSE_PROBE, "plain") > pages // 2  # glibc maps a block this large afresh: every page faults
    assert run_probe(_REUSE_PROBE, "tuned") < pages // 100  # from the heap, freed and reused: its pages are there


_RELEASE_PROBE = _LIBC + """
import resource
from features.extract import release_free_memory, tune_malloc
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
tune_malloc()
size = 64 << 20
block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
kept = resident_mb()
release_free_memory()
print(kept - resident_mb())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/statm"),
                    reason="glibc's malloc, resident size from /proc")
def test_free_heap_is_released_before_the_workers_fork(synth_files, make_manifest, tiny_encoder_dir, tmp_path,
                                                       monkeypatch, run_probe):
    assert run_probe(_RELEASE_PROBE) > 48  # the tuned heap kept the freed 64 MB; released, it is gone

    workers_then = []
    monkeypatch.setattr(extract_mod, "release_free_memory",
                        lambda: workers_then.append(len(extract_mod.multiprocessing.active_children())))
    summary = extract([make_manifest(synth_files)], tmp_path / "f.h5", encoder=str(tiny_encoder_dir), device="cpu",
                      procs=2, part_entries=2, tail_alone=0)
    assert summary["computed"] == len(synth_files) and workers_then == [0]
