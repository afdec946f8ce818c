"""The HDF5 store: layout, reader, synthetic writer, atomic writes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from features.store import (
    FeatureStore,
    StoreWriter,
    atomic_path,
    escape_id,
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


def test_write_and_read(tmp_path, entries):
    path = write_store(tmp_path / "f.h5", entries, {"encoder": "x", "layers": [0, 6, 12]})
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
        assert fs.attrs["encoder"] == "x" and fs.attrs["layers"] == [0, 6, 12]
        assert {"kind", "revision", "sample_rate", "dtype", "storage_dtype", "max_seconds", "offset_seconds",
                "versions"} <= set(fs.attrs)
        with pytest.raises(KeyError, match="not in"):
            fs.frames("nope", 0)
        with pytest.raises(IndexError, match="attrs\\['layers'\\]"):
            fs.frames("c/Actor_01/a", 3)
    with h5py.File(path) as f:  # the documented layout
        assert f["utterances/c%2FActor_01%2Fa/frames"].shape == (3, 7, 4)
        assert f["utterances/c%2FActor_01%2Fa"].attrs["id"] == "c/Actor_01/a"


def test_frames_extent_is_where_the_frames_lie_in_the_file(tmp_path, entries):
    path = write_store(tmp_path / "f.h5", entries, {"storage_dtype": "float32"})
    raw = path.read_bytes()
    with FeatureStore(path) as fs:
        for uid, (frames, _) in entries.items():
            offset, size = fs.frames_extent(uid)
            assert size == frames.nbytes
            np.testing.assert_array_equal(np.frombuffer(raw[offset:offset + size], "<f4").reshape(frames.shape), frames)


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


def test_pieces_pool_like_whole(tmp_path):
    rng = np.random.default_rng(1)
    frames = (rng.standard_normal((2, 50, 3)) * 5 + 100).astype(np.float32)
    with StoreWriter(tmp_path / "f.h5", {"layers": [0, 1], "storage_dtype": "float32"}) as w:
        w.add_pieces("u", [frames[:, :13], frames[:, 13:14], frames[:, 14:]], num_frames=50, hidden_size=3)
        with pytest.raises(ValueError, match="expected 10 frames"):
            w.add_pieces("v", [frames[:, :4]], num_frames=10, hidden_size=3)
        w.add_pieces("v", [frames[:, :4], frames[:, 4:10]], num_frames=10, hidden_size=3)  # the id is free again
    with FeatureStore(tmp_path / "f.h5") as fs:
        assert fs.ids() == ["u", "v"]  # the failed entry left nothing behind
        np.testing.assert_array_equal(fs.all_frames("v"), frames[:, :10])
        np.testing.assert_allclose(fs.pooled("u"), mean_std(frames), rtol=1e-6)
        np.testing.assert_array_equal(fs.all_frames("u"), frames)


def test_float16_overflow_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="float32"):
        write_store(tmp_path / "f.h5", {"u": (np.full((1, 2, 2), 1e6), None)}, {"storage_dtype": "float16"})
    assert not (tmp_path / "f.h5").exists() and list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_old_file_on_failure(tmp_path, entries):
    path = write_store(tmp_path / "f.h5", entries, {})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    with FeatureStore(path) as fs:
        assert len(fs) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]


def test_reader_rejects_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="features.extract"):
        FeatureStore(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(ValueError, match="ser-features/1"):
        FeatureStore(tmp_path / "other.h5")
