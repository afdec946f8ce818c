"""The feature store: layout, identity, reader, checksums, synthetic writer."""

from __future__ import annotations

import json
import os
import sys

import h5py
import numpy as np
import pytest

import features.store as store_module
from features.store import (
    FeatureStore,
    StoreWriter,
    escape_id,
    identity_of,
    identity_slug,
    mean_std,
    unescape_id,
    write_store,
)


@pytest.mark.parametrize("uid", ["ravdess/Actor_01/03-01-01-01-01-01-01", ".hidden/x", "a%2Fb", "%2E", "..", "x"])
def test_escape_round_trip(uid):
    name = escape_id(uid)
    assert "/" not in name and name not in {".", ".."} and not name.startswith(".")
    assert unescape_id(name) == uid


@pytest.fixture
def entries():
    rng = np.random.default_rng(0)
    return {"c/Actor_01/a": (rng.standard_normal((3, 7, 4)).astype(np.float32), None),
            "c/Actor_02/b": (rng.standard_normal((3, 2, 4)).astype(np.float32), None)}


def shards(collection):
    return sorted(collection.glob("*/shards/*.h5"))


def test_write_and_read(tmp_path, entries):
    path = write_store(tmp_path / "f.h5", entries, {"encoder": "org/x-base", "layers": [0, 6, 12]})
    with FeatureStore(path) as fs:
        assert fs.ids() == ["c/Actor_01/a", "c/Actor_02/b"]
        assert fs.num_layers == 3 and len(fs) == 2
        assert "c/Actor_01/a" in fs and "c/Actor_01/zz" not in fs
        assert fs.num_frames("c/Actor_01/a") == 7
        frames = entries["c/Actor_01/a"][0]
        np.testing.assert_array_equal(fs.frames("c/Actor_01/a", 2), frames[2])
        np.testing.assert_array_equal(fs.all_frames("c/Actor_01/a"), frames)
        assert fs.pooled("c/Actor_01/a").shape == (3, 8)
        np.testing.assert_allclose(fs.pooled("c/Actor_01/a")[:, :4], frames.mean(1), rtol=1e-6)
        np.testing.assert_allclose(fs.pooled("c/Actor_01/a")[:, 4:], frames.std(1), rtol=1e-5)
        assert fs.attrs["encoder"] == "org/x-base" and fs.attrs["layers"] == [0, 6, 12]
        assert {"kind", "revision", "sample_rate", "dtype", "storage_dtype", "max_seconds", "offset_seconds",
                "versions"} <= set(fs.attrs)
        assert fs.entry_attrs("c/Actor_02/b")["num_frames"] == 2
        with pytest.raises(KeyError, match="not in"):
            fs.frames("nope", 0)
        with pytest.raises(IndexError, match="attrs\\['layers'\\]"):
            fs.frames("c/Actor_01/a", 3)
    # the documented layout: a collection, one identity store, one checksummed shard
    current = json.loads((path / "current.json").read_text())
    store = path / current["store"]
    assert current["format"] == "ser-features/2" and sorted(current["entries"]) == sorted(entries)
    assert current["store"].startswith("x-base-float32-") and len(current["store"].rsplit("-", 1)[1]) == 12
    assert json.loads((store / "store.json").read_text())["identity"]["layers"] == [0, 6, 12]
    (shard,) = shards(path)
    index = json.loads((store / "index.json").read_text())
    assert index[shard.name]["entries"] == current["entries"] and index[shard.name]["size"] == shard.stat().st_size
    with h5py.File(shard) as f:
        frames = f["utterances/c%2FActor_01%2Fa/frames"]
        assert frames.shape == (3, 7, 4) and frames.chunks == (1, 7, 4) and frames.fletcher32
        assert f["utterances/c%2FActor_01%2Fa/pooled"].fletcher32
        assert f["utterances/c%2FActor_01%2Fa"].attrs["id"] == "c/Actor_01/a"
        assert f.attrs["format"] == "ser-features/2" and json.loads(f.attrs["meta"])["versions"] == {}


def test_identity_leaves_out_what_describes_a_run():
    meta = {"kind": "wav2vec2", "encoder": "/models/wav2vec2-base/", "dtype": "bfloat16", "layers": [0, 1],
            "max_seconds": 20.0, "versions": {"torch": "2.1"}, "provenance": {"cpu": "x"}}
    slug = identity_slug(identity_of(meta))
    assert slug.startswith("wav2vec2-base-bfloat16-")
    assert identity_slug(identity_of({**meta, "versions": {"torch": "9"}, "provenance": {"gpu": "y"}})) == slug
    assert identity_slug(identity_of({**meta, "max_seconds": 20})) == slug  # the same setting, written as int
    assert identity_slug(identity_of({**meta, "layers": [0, 2]})) != slug
    assert identity_slug(identity_of({**meta, "dtype": "float32"})).startswith("wav2vec2-base-float32-")
    assert identity_slug({"kind": "egemaps", "encoder": None, "dtype": "float32"}).startswith("egemaps-float32-")


def test_attrs_hold_the_identity_and_the_newest_run_keys(tmp_path, entries):
    first = dict(list(entries.items())[:1])
    write_store(tmp_path / "f.h5", first, {"versions": {"torch": "1"}, "provenance": {"cpu": "old"}})
    write_store(tmp_path / "f.h5", entries, {"versions": {"torch": "2"}, "provenance": {"cpu": "new"}})
    (store,) = [p for p in (tmp_path / "f.h5").iterdir() if p.is_dir()]  # one identity: the run keys differ only
    with FeatureStore(tmp_path / "f.h5") as fs:
        assert fs.attrs["versions"] == {"torch": "2"} and fs.attrs["provenance"] == {"cpu": "new"}
        assert len(fs) == 2
    assert len(shards(tmp_path / "f.h5")) == 2  # nothing rewritten: the second call added a shard


def test_given_pooled_and_float16(tmp_path, entries):
    frames = entries["c/Actor_01/a"][0]
    path = write_store(tmp_path / "f.h5", {"u": (frames, np.arange(5.0)[None])},
                       {"storage_dtype": "float16", "kind": "egemaps"})
    with FeatureStore(path) as fs:
        np.testing.assert_array_equal(fs.pooled("u"), [np.arange(5.0)])
        got = fs.frames("u", 1)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, frames[1], rtol=1e-3, atol=1e-4)
        assert not np.array_equal(got, frames[1])  # it was really stored as float16


def test_pieces_pool_like_whole_and_are_written_in_whole_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "CHUNK_FRAMES", 8)
    rng = np.random.default_rng(1)
    frames = (rng.standard_normal((2, 50, 3)) * 5 + 100).astype(np.float32)
    with StoreWriter(tmp_path / "s.h5", {"layers": [0, 1], "storage_dtype": "float32"}) as w:
        w.add_pieces("u", [frames[:, :13], frames[:, 13:14], frames[:, 14:]], num_frames=50, hidden_size=3)
        with pytest.raises(ValueError, match="expected 10 frames"):
            w.add_pieces("v", [frames[:, :4]], num_frames=10, hidden_size=3)
        w.add_pieces("v", [frames[:, :4], frames[:, 4:10]], num_frames=10, hidden_size=3)  # the id is free again
    with h5py.File(tmp_path / "s.h5") as f:
        assert sorted(f["utterances"]) == ["u", "v"]  # the failed entry left nothing behind
        assert f["utterances/u/frames"].chunks == (1, 8, 3)
        np.testing.assert_array_equal(f["utterances/u/frames"][()], frames)
        np.testing.assert_array_equal(f["utterances/v/frames"][()], frames[:, :10])
        np.testing.assert_allclose(f["utterances/u/pooled"][()], mean_std(frames), rtol=1e-6)


@pytest.mark.parametrize("with_torch", [True, False])
@pytest.mark.parametrize(("bad", "dtype", "storage"), [(1e6, np.float64, "float16"), (-1e6, np.float32, "float16"),
                                                       (np.nan, np.float32, "float16"), (np.inf, np.float16, "float16"),
                                                       (-np.inf, np.float32, "float32"), (np.nan, np.float16, "float32")])
def test_values_the_storage_cannot_hold_are_an_error_and_leave_nothing(tmp_path, monkeypatch, bad, dtype, storage,
                                                                       with_torch):
    if not with_torch:  # the writer checks through torch when it is loaded, through numpy otherwise
        monkeypatch.delitem(sys.modules, "torch", raising=False)
    frames = np.zeros((2, 3, 4), dtype)
    frames[1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"u: values out of .* range.*--storage-dtype float32"):
        write_store(tmp_path / "f.h5", {"u": (frames, None)}, {"storage_dtype": storage})
    assert list(tmp_path.iterdir()) == []
    frames[1, 2, 3] = 60000.0  # the largest float16 is 65504: still fits
    with FeatureStore(write_store(tmp_path / "f.h5", {"u": (frames, None)}, {"storage_dtype": storage})) as fs:
        assert fs.frames("u", 1)[2, 3] == 60000.0


def test_failed_write_keeps_the_previous_view(tmp_path, entries):
    path = write_store(tmp_path / "f.h5", entries, {})
    before = (path / "current.json").read_bytes()
    with pytest.raises(ValueError, match="float32"):
        write_store(path, {"u": (np.full((3, 2, 4), 1e6), None)}, {"storage_dtype": "float16"})
    assert (path / "current.json").read_bytes() == before
    assert not list(path.rglob("*.tmp-*"))
    with FeatureStore(path) as fs:
        assert len(fs) == 2


def test_identity_store_reads_the_newest_entry_of_every_utterance(tmp_path, entries):
    old = {"c/Actor_01/a": (np.zeros((3, 4, 4), np.float32), None)}
    write_store(tmp_path / "f.h5", old, {})
    write_store(tmp_path / "f.h5", {"c/Actor_02/b": entries["c/Actor_02/b"]}, {})
    write_store(tmp_path / "f.h5", {"c/Actor_01/a": entries["c/Actor_01/a"]}, {})
    (store,) = [p for p in (tmp_path / "f.h5").iterdir() if p.is_dir()]
    with FeatureStore(store) as fs:
        assert fs.ids() == ["c/Actor_01/a", "c/Actor_02/b"]
        np.testing.assert_array_equal(fs.all_frames("c/Actor_01/a"), entries["c/Actor_01/a"][0])
    with FeatureStore(tmp_path / "f.h5") as fs:  # the collection: the last write's view
        assert fs.ids() == ["c/Actor_01/a"]


def test_readers_rebuild_what_the_index_lacks(tmp_path, entries):
    path = write_store(tmp_path / "f.h5", entries, {})
    (index,) = path.glob("*/index.json")
    index.unlink()  # as a run killed after publishing its shards leaves it
    with FeatureStore(path) as fs:
        np.testing.assert_array_equal(fs.all_frames("c/Actor_02/b"), entries["c/Actor_02/b"][0])
    assert not index.exists()  # readers write nothing


@pytest.mark.parametrize("edit", [{"entries": "oops"}, {"entries": [1, 2]}, {"entries": {"u": 3}},
                                  {"size": "12"}, {"corrupt": []}])
def test_an_index_of_the_wrong_shape_is_rebuilt_not_trusted(tmp_path, entries, edit):
    path = write_store(tmp_path / "f.h5", entries, {})
    (index,) = path.glob("*/index.json")
    records = json.loads(index.read_text())
    for record in records.values():
        record.update(edit)
    index.write_text(json.dumps(records))
    with FeatureStore(path) as fs:
        assert fs.ids() == sorted(entries)
        np.testing.assert_array_equal(fs.all_frames("c/Actor_02/b"), entries["c/Actor_02/b"][0])


def test_an_index_claiming_an_entry_its_shard_lacks_is_blamed_not_the_shard(tmp_path, entries):
    write_store(tmp_path / "f.h5", {"c/Actor_01/a": entries["c/Actor_01/a"]}, {})
    path = write_store(tmp_path / "f.h5", entries, {})
    (index,) = path.glob("*/index.json")
    records = json.loads(index.read_text())
    first, second = sorted(records)
    source = records[second]["entries"].pop("c/Actor_02/b")
    records[first]["entries"]["c/Actor_02/b"] = source  # an edit: the first shard never held it
    index.write_text(json.dumps(records))
    with FeatureStore(path) as fs, pytest.raises(store_module.IndexMismatch, match=r"index\.json.*intact.*Delete") \
            as raised:
        fs.all_frames("c/Actor_02/b")
    assert isinstance(raised.value, ValueError)  # the command lines print it as one "error:" line
    index.unlink()
    with FeatureStore(path) as fs:
        np.testing.assert_array_equal(fs.all_frames("c/Actor_02/b"), entries["c/Actor_02/b"][0])


def test_shard_files_are_opened_lazily_and_boundedly(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_OPEN_SHARDS", 2)
    for i in range(5):
        write_store(tmp_path / "f.h5", {f"u{i}": (np.full((1, 3, 2), i, np.float32), None)}, {})
    (store,) = [p for p in (tmp_path / "f.h5").iterdir() if p.is_dir()]

    def open_shards() -> int:
        links = (os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                 if os.path.exists(f"/proc/self/fd/{fd}"))
        return sum(str(store / "shards") in link for link in links)

    with FeatureStore(store) as fs:
        assert fs.ids() == [f"u{i}" for i in range(5)]
        for i in range(5):
            assert fs.frames(f"u{i}", 0)[0, 0] == i
            assert open_shards() <= 2
    assert open_shards() == 0


def test_damaged_shard_fails_on_read_with_a_clear_error(tmp_path, entries, corrupt_frames):
    path = write_store(tmp_path / "f.h5", entries, {})
    (shard,) = shards(path)
    corrupt_frames(shard, "c/Actor_01/a")
    with FeatureStore(path) as fs:
        with pytest.raises(OSError, match=r"c/Actor_01/a: .*" + shard.name + r".*damaged.*extraction"):
            fs.frames("c/Actor_01/a", 0)
        with pytest.raises(OSError, match="c/Actor_01/a"):
            fs.all_frames("c/Actor_01/a")
        np.testing.assert_array_equal(fs.frames("c/Actor_01/a", 1), entries["c/Actor_01/a"][0][1])  # other chunk
        np.testing.assert_array_equal(fs.all_frames("c/Actor_02/b"), entries["c/Actor_02/b"][0])


def test_reader_rejects_what_is_not_a_store(tmp_path, entries):
    with pytest.raises(FileNotFoundError, match="features.extract"):
        FeatureStore(tmp_path / "missing")
    with h5py.File(tmp_path / "old.h5", "w") as f:  # a store of the former single-file format
        f.attrs["format"] = "ser-features/1"
    with pytest.raises(ValueError, match="ser-features/2.*found an HDF5 file.*ser-features/1.*--out"):
        FeatureStore(tmp_path / "old.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="current.json or store.json"):
        FeatureStore(tmp_path / "empty")
    path = write_store(tmp_path / "f.h5", entries, {})
    (store,) = [p for p in path.iterdir() if p.is_dir()]
    (path / "current.json").rename(tmp_path / "current.json")
    with pytest.raises(ValueError, match=f"no finished run.*{store.name}"):
        FeatureStore(path)
    view = json.loads((tmp_path / "current.json").read_text())
    (path / "current.json").write_text(json.dumps({**view, "entries": {**view["entries"], "c/x": "0" * 32}}))
    with pytest.raises(ValueError, match="1 entries of the last run's view are in no shard.*'c/x'.*Rerun"):
        FeatureStore(path)
    (path / "current.json").write_text(json.dumps({**view, "store": "gone"}))
    with pytest.raises(FileNotFoundError, match="'gone'.*Rerun"):
        FeatureStore(path)
    (path / "current.json").write_text("{")
    with pytest.raises(ValueError, match="current view.*Rerun"):
        FeatureStore(path)
