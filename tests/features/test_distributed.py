"""Extraction beyond one machine: Ray actors and --shard K/N give the single-process store; kills lose one shard."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time

import h5py
import numpy as np
import psutil
import pytest

from features import distributed
from features import extract as extract_module
from features.extract import extract, main
from features.store import FeatureStore

# the feature-encoder implementation is fixed: "auto" picks by timing, and implementations differ in rounding
SETTINGS = {"device": "cpu", "dtype": "float32", "storage_dtype": "float32", "tail_alone": 0,
            "feature_encoder": "library"}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local two-CPU Ray cluster shared by this module's Ray tests (skipped without the ``ray`` extra)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def clips(tmp_path, write_audio, make_manifest):
    """A manifest of twelve clips of mixed lengths."""
    files = [write_audio(tmp_path / "audio" / f"s{i % 3}" / f"u{i:02d}.wav", seconds=0.6 + 0.25 * i, seed=i)
             for i in range(12)]
    return make_manifest(files)


def _single_process(manifest, tmp_path, encoder, **kw):
    out = tmp_path / "single"
    extract([manifest], out, encoder=str(encoder), procs=1, **{**SETTINGS, **kw})
    return out


def _files_state(root):
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_store(a, b, n):
    with FeatureStore(a) as x, FeatureStore(b) as y:
        assert sorted(x.ids()) == sorted(y.ids()) and len(x) == n
        assert x.store.path.name == y.store.path.name  # same settings, same identity store
        for uid in x.ids():
            np.testing.assert_array_equal(x.all_frames(uid), y.all_frames(uid))
            np.testing.assert_array_equal(x.pooled(uid), y.pooled(uid))


@pytest.mark.parametrize("feature_encoder", ["library", "strided_matmul"])
def test_ray_actors_give_the_single_process_store_and_a_rerun_computes_nothing(ray_cluster, clips, tmp_path,
                                                                                tiny_encoder_dir, feature_encoder):
    out = tmp_path / "ray"
    settings = {**SETTINGS, "feature_encoder": feature_encoder}  # the actors compute with the driver's choice
    summary = extract([clips], out, encoder=str(tiny_encoder_dir), engine="ray", part_entries=3, **settings)
    assert summary["computed"] == 12 and summary["skipped"] == 0 and summary["stored"] == 12
    assert len(list(out.glob("*/shards/*.h5"))) >= 4  # several tasks, each its own shard
    assert_same_store(out, _single_process(clips, tmp_path, tiny_encoder_dir, **settings), 12)
    with FeatureStore(out) as fs:
        assert fs.attrs["provenance"]["engine"] == "ray" and fs.attrs["provenance"]["procs"] == 2
        assert fs.attrs["provenance"]["feature_encoder"] == feature_encoder
    before = _files_state(out)
    again = extract([clips], out, encoder=str(tiny_encoder_dir), engine="ray", part_entries=3, **settings)
    assert again["computed"] == 0 and again["reused"] == 12
    assert _files_state(out) == before


def test_ray_actors_load_what_a_given_encoder_was_loaded_from(ray_cluster, clips, tmp_path, tiny_encoder_dir):
    """An :class:`Encoder` passed in (not a name): the actors start once the run has passes, loading its checkpoint."""
    from features.encoder import load_encoder

    enc = load_encoder(str(tiny_encoder_dir), device="cpu", dtype="float32", feature_encoder="library")
    out = tmp_path / "ray"
    summary = extract([clips], out, encoder=enc, engine="ray", part_entries=3,
                      **{k: v for k, v in SETTINGS.items() if k not in {"device", "dtype", "feature_encoder"}})
    assert summary["computed"] == 12
    assert_same_store(out, _single_process(clips, tmp_path, tiny_encoder_dir), 12)


def _actor_pids():
    return [p.pid for p in psutil.process_iter(["cmdline"]) if any("_Extractor" in part
                                                                    for part in p.info["cmdline"] or [])]


def test_actors_started_before_the_model_loads_are_stopped_when_the_run_fails(ray_cluster, clips, tmp_path,
                                                                              tiny_encoder_dir, monkeypatch):
    started = []

    class Recorded(distributed.RayActors):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            started.append(list(self._actors))

    monkeypatch.setattr(extract_module, "RayActors", Recorded)
    with pytest.raises(ValueError, match="--layers"):  # found only once the driver's model is loaded
        extract([clips], tmp_path / "ray", encoder=str(tiny_encoder_dir), engine="ray", layers="99", **SETTINGS)
    assert len(started) == 1 and len(started[0]) == 2  # one per CPU of the cluster, before the error
    deadline = time.monotonic() + 30
    while _actor_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _actor_pids() == []
    assert not (tmp_path / "ray").exists()


def test_an_actors_os_error_reaches_the_driver_as_itself(ray_cluster, clips, tmp_path, tiny_encoder_dir,
                                                         monkeypatch):
    import errno

    from features.cache import StoreBuild

    gone = tmp_path / "no-such-folder"  # where the actors are told to write: their write fails there
    monkeypatch.setattr(StoreBuild, "reserve_part", lambda self: gone / "part.h5")
    with pytest.raises(OSError) as raised:
        extract([clips], tmp_path / "ray", encoder=str(tiny_encoder_dir), engine="ray", **SETTINGS)
    assert raised.value.errno == errno.ENOENT and str(gone) in str(raised.value)  # errno kept, as locally
    assert not isinstance(raised.value, ray_cluster.exceptions.RayTaskError)


def test_an_actor_that_cannot_load_the_encoder_says_why(ray_cluster, tmp_path, tiny_encoder_dir):
    """A node without the model folder: its actor's constructor fails; the driver says so, with the node's error."""
    from features.encoder import load_encoder

    enc = load_encoder(tiny_encoder_dir, device="cpu", dtype="float32", feature_encoder="library")
    load = {"name_or_dir": str(tmp_path / "not-on-this-node"), "device": "cpu", "dtype": "float32"}
    actors = distributed.RayActors(None, load=load, gpu=False, init=extract_module._init_worker,
                                   work=extract_module._work, max_restarts=1)
    with pytest.raises(OSError, match=r"could not load the encoder: OSError: cannot load encoder .*not-on-this-node"
                                      r"(.|\n)*same paths"):
        list(actors.run([[]], [str(tmp_path / "part.h5")], {}, None, enc=enc))


def test_a_killed_actor_loses_only_its_shard_which_is_recomputed(ray_cluster, tmp_path, write_audio, make_manifest,
                                                                tiny_encoder_dir):
    files = [write_audio(tmp_path / "audio" / f"u{i:02d}.wav", seconds=6.0 + 0.1 * i, seed=i) for i in range(12)]
    manifest = make_manifest(files)
    out = tmp_path / "ray"
    result = {}
    run = threading.Thread(target=lambda: result.update(extract(
        [manifest], out, encoder=str(tiny_encoder_dir), engine="ray", max_batch=1, part_entries=4, **SETTINGS)))
    run.start()
    deadline, victim = time.monotonic() + 120, None
    while victim is None and run.is_alive() and time.monotonic() < deadline:
        if list(out.glob("*/shards/*.h5")):  # a shard is published: the actors are computing their next ones
            victim = next(iter(_actor_pids()), None)
        time.sleep(0.002)
    assert victim is not None, "no actor was computing"
    os.kill(victim, signal.SIGKILL)  # killed mid-shard: its shard in progress is never published
    run.join(180)
    assert result["computed"] == 12 and result["stored"] == 12
    assert_same_store(out, _single_process(manifest, tmp_path, tiny_encoder_dir, max_batch=1), 12)
    again = extract([manifest], out, encoder=str(tiny_encoder_dir), engine="ray", max_batch=1, **SETTINGS)
    assert again["computed"] == 0
    assert not list(out.rglob("*.tmp-*"))  # the killed actor's debris is gone


def test_shard_halves_then_an_index_call_equal_the_whole(clips, tmp_path, tiny_encoder_dir, capsys):
    out = tmp_path / "sharded"
    cli = ["--manifest", str(clips), "--out", str(out), "--encoder", str(tiny_encoder_dir), "--device", "cpu",
           "--dtype", "float32", "--storage-dtype", "float32", "--procs", "1", "--part-entries", "2",
           "--feature-encoder", "library"]
    def run(*extra) -> tuple[int, str]:
        """The command line's exit status and the number of rows it computed (from its summary line)."""
        status = main([*cli, *extra])
        printed = capsys.readouterr().out
        return status, printed, int(re.search(r"(\d+) computed", printed).group(1))

    status, printed, second = run("--shard", "2/2")  # members run in any order
    assert status == 0 and "run once more without --shard" in printed
    assert not (out / "current.json").exists() and not list(out.glob("*/index.json"))  # the final call writes them
    _, _, first = run("--shard", "1/2")
    assert first > 0 and second > 0 and first + second == 12
    assert run("--shard", "1/2")[2] == 0  # a member rerun computes nothing: the shards agree whatever is done
    status, printed, computed = run()
    assert status == 0 and computed == 0 and "12 utterances in" in printed
    assert_same_store(out, _single_process(clips, tmp_path, tiny_encoder_dir, tail_alone=16), 12)  # the CLI's


def test_shard_members_timing_at_once_compute_with_the_first_ones_choice(clips, tmp_path, tiny_encoder_dir,
                                                                        monkeypatch):
    out = tmp_path / "sharded"
    kw = {"encoder": str(tiny_encoder_dir), "device": "cpu", "dtype": "float32", "storage_dtype": "float32",
          "procs": 1, "part_entries": 2}  # feature_encoder auto: timed
    store_dir = []

    def member_one_times(enc):  # its node finds the plug-in faster
        enc.use_feature_encoder("strided_matmul")
        enc.use_frame_grid(8)
        enc.feature_encoder_timing = {"chosen": "strided_matmul", "frame_grid": 8}

    def member_two_times(enc):  # its node would pick the library's modules, but member one records its choice first
        (store,) = [p for p in out.iterdir() if p.is_dir()]
        store_dir.append(store)
        (store / extract_module.FEATURE_ENCODER_CHOICE).write_text(
            '{"feature_encoder": "strided_matmul", "frame_grid": 8, "feature_encoder_version": 2}')
        enc.feature_encoder_timing = {"chosen": "library", "frame_grid": 1}

    monkeypatch.setattr(extract_module, "choose_feature_encoder", member_two_times)
    extract([clips], out, shard=(2, 2), **kw)
    monkeypatch.setattr(extract_module, "choose_feature_encoder", lambda enc: pytest.fail("timed after a choice"))
    extract([clips], out, shard=(1, 2), **kw)
    assert extract([clips], out, **kw)["computed"] == 0
    shards = sorted((store_dir[0] / "shards").glob("*.h5"))
    assert len(shards) >= 2
    for shard in shards:  # every member's shards computed alike
        with h5py.File(shard, "r") as f:
            record = json.loads(f.attrs["meta"])["provenance"]
        assert (record["feature_encoder"], record["frame_grid"]) == ("strided_matmul", 8), shard.name
    monkeypatch.setattr(extract_module, "choose_feature_encoder", member_one_times)
    single = tmp_path / "single"
    extract([clips], single, **kw)
    assert_same_store(out, single, 12)


def test_shard_members_agree_on_dtype_auto_and_on_who_computes_a_file_some_cannot_read(
        clips, tmp_path, tiny_encoder_dir, monkeypatch, capsys):
    import pandas as pd

    import features.encoder

    out = tmp_path / "sharded"
    kw = {"encoder": str(tiny_encoder_dir), "device": "cpu", "dtype": "auto", "storage_dtype": "float32",
          "procs": 1, "part_entries": 2, "feature_encoder": "library"}
    picks = iter(["bfloat16", "float32", "float32"])  # the first member's node times bfloat16 faster, others not
    timed = lambda dtype, dev: next(picks) if dtype == "auto" else dtype  # noqa: E731
    monkeypatch.setattr(extract_module, "pick_dtype", timed)
    monkeypatch.setattr(features.encoder, "pick_dtype", timed)
    rows = pd.read_csv(clips)
    hidden = tmp_path / "hidden.csv"  # member two's node cannot read one file yet (a lagging mount)
    rows.assign(path=[p + ".missing" if i == 5 else p for i, p in enumerate(rows["path"])]).to_csv(hidden, index=False)
    one = extract([clips], out, shard=(1, 2), **kw)
    two = extract([hidden], out, shard=(2, 2), **kw)
    final = extract([clips], out, **kw)
    assert one["computed"] + two["computed"] + final["computed"] == 12  # every row once, none by two members,
    assert final["computed"] <= 1  # and none left to the final call but the file member two could not read
    assert [p.name for p in out.iterdir() if p.is_dir()] and len([p for p in out.iterdir() if p.is_dir()]) == 1
    with FeatureStore(out) as fs:
        assert fs.attrs["dtype"] == "bfloat16" and len(fs) == 12


def test_shard_and_engine_errors(monkeypatch, clips, tmp_path, tiny_encoder_dir, capsys):
    for bad in ["0/2", "3/2", "1/0", "a/b", "1"]:
        with pytest.raises(ValueError, match="expected K/N with 1 <= K <= N"):
            distributed.parse_shard(bad)
    assert distributed.parse_shard("2/8") == (2, 8)
    for bad in ["0/2", "abc"]:  # the command line prints the same explanation, not argparse's generic one
        with pytest.raises(SystemExit):
            main(["--manifest", str(clips), "--out", str(tmp_path / "f"), "--shard", bad])
        assert "expected K/N with 1 <= K <= N" in capsys.readouterr().err
    with socket.socket() as listener:  # a port nothing listens on: refused at once, where Ray retries for ever
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    with pytest.raises(ConnectionError, match=f"--address 127.0.0.1:{port}: expected the Ray head"):
        distributed.check_reachable(f"127.0.0.1:{port}")
    monkeypatch.setattr(distributed, "ray", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[ray\]"'):
        extract([clips], tmp_path / "f", encoder=str(tiny_encoder_dir), engine="ray", **SETTINGS)
    with pytest.raises(ValueError, match="expected one of local, ray"):
        extract([clips], tmp_path / "f", encoder=str(tiny_encoder_dir), engine="spark", **SETTINGS)


def test_an_actor_computes_with_the_drivers_feature_encoder_and_frame_grid(tiny_encoder_dir):
    """The actor class itself (Ray only places it): each task sets the implementation and the frame grid the
    driver chose at start-up before it runs, so Ray and the single-machine path compute the same passes."""
    from functools import partial

    from features.distributed import _Extractor, encoder_facts
    from features.encoder import load_encoder

    seen = []
    load = partial(load_encoder, str(tiny_encoder_dir), device="cpu", dtype="float32", feature_encoder="library")
    expected = encoder_facts(load())
    actor = _Extractor(load, lambda e: None, lambda *task: seen.append(task))
    actor.work(["batch"], "part", {}, "job", expected, "strided_matmul", 8)
    assert seen == [(["batch"], "part", {}, "job")]
    assert actor.enc.feature_encoder == "strided_matmul" and actor.enc.frame_grid == 8
    actor.work(["batch"], "part", {}, "job", expected, "library", 1)
    assert actor.enc.feature_encoder == "library" and actor.enc.frame_grid == 1
    for key, other in [("dtype", "bfloat16"), ("revision", "local:0"), ("chunk_seconds", 10.0),
                       ("torch", "1.0.0")]:  # a node with another torch would round differently
        with pytest.raises(ValueError, match=f"expected an encoder with .*'{key}': '?{other}"):
            actor.work(["batch"], "part", {}, "job", {**expected, key: other}, "library", 1)
    assert len(seen) == 2  # a mismatched actor computes nothing
