"""Building a store: append-only shards, reruns that write nothing, identities side by side, kill and resume,
changed and reverted audio, damaged shards recomputed."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from features.cache import PartWriter, StoreBuild, publish, source_hash, write_skips
from features.store import FeatureStore, identity_of, identity_slug, mean_std, writer_tag
from pipeline.roots import read_manifests

META_A = {"kind": "wav2vec2", "encoder": "org/enc-a", "revision": None, "sample_rate": 16000, "layers": [0, 1, 2],
          "dtype": "float32", "storage_dtype": "float32", "max_seconds": None, "offset_seconds": 0.0,
          "versions": {"numpy": np.__version__}, "provenance": {"device": "test"}}
META_B = {**META_A, "encoder": "org/enc-b"}


def features_of(path: str, meta: dict) -> np.ndarray:
    """Stand-in for an encoder: ``[L, T, H]`` frames determined by the file's bytes and the settings."""
    seed = int(source_hash(path)[:8], 16) + (meta["encoder"] == META_B["encoder"])
    rng = np.random.default_rng(seed)
    return rng.standard_normal((len(meta["layers"]), 3 + seed % 5, 4)).astype(np.float32)


def run_build(out, manifest, meta=META_A, *, part_entries: int = 2, kill_after: int | None = None) -> dict:
    """One build as a stage runs it: plan, compute what is missing into rolling shards, finish."""
    build = StoreBuild(out, meta, part_entries=part_entries)
    todo, skipped = build.plan(read_manifests([manifest], keep_default_na=False))
    computed = 0
    for row in todo.itertuples(index=False):
        if computed == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        frames = features_of(row.path, meta)  # pooled given: the same arithmetic in every process
        build.add(row.id, source=row.source, frames=frames, pooled=mean_std(frames), path=row.path)
        computed += 1
    return publish("build", build, out=out, skips=None, skipped=skipped, computed=computed, audio_seconds=0.0)


@pytest.fixture
def audio(tmp_path, write_audio):
    return [write_audio(tmp_path / "audio" / f"s{i % 2}" / f"u{i}.wav", seconds=0.3 + 0.05 * i, seed=i)
            for i in range(8)]


def snapshot(folder: Path) -> dict:
    """Every file below ``folder``: ``{relative path: (inode, mtime_ns, size)}``."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def shard_files(out: Path, meta=META_A) -> list[Path]:
    return sorted((out / identity_slug(identity_of(meta)) / "shards").glob("*.h5"))


def view(out: Path) -> dict:
    return json.loads((out / "current.json").read_text())


def assert_holds(out: Path, files, meta=META_A) -> None:
    """The collection's view is exactly ``files``, each with the features of its current bytes."""
    with FeatureStore(out) as fs:
        assert len(fs) == len(files)
        for path in files:
            uid = f"synth/{path.parent.name}/{path.stem}"
            np.testing.assert_array_equal(fs.all_frames(uid), features_of(str(path), meta))
            assert fs.entry_attrs(uid)["source"] == source_hash(path)


def test_adding_rows_appends_shards_and_a_rerun_writes_nothing(audio, make_manifest, tmp_path):
    out = tmp_path / "feats"
    first = run_build(out, make_manifest(audio[:4]))
    assert (first["computed"], first["reused"], first["stored"], first["corrupt"]) == (4, 0, 4, 0)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shard_files(out)}
    assert len(before) == 2  # 2 entries per shard
    added = run_build(out, make_manifest(audio))
    assert (added["computed"], added["reused"], added["stored"]) == (4, 4, 8)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in before} == before  # untouched
    assert len(shard_files(out)) == 4
    assert_holds(out, audio)

    skips = Path(f"{out}.skips.csv")
    files = {**snapshot(out), "skips": snapshot(skips.parent)[skips.name]}
    again = run_build(out, make_manifest(audio))
    assert (again["computed"], again["reused"], again["stored"], again["removed"]) == (0, 8, 8, 0)
    assert {**snapshot(out), "skips": snapshot(skips.parent)[skips.name]} == files  # not one file written

    fewer = run_build(out, make_manifest(audio[2:]))
    assert (fewer["computed"], fewer["stored"], fewer["removed"]) == (0, 6, 2)
    assert {k: v for k, v in snapshot(out).items() if "/shards/" in k} == \
        {k: v for k, v in files.items() if "/shards/" in k}  # dropping rows changes the view only
    assert_holds(out, audio[2:])


def test_switching_settings_back_and_forth_computes_nothing_the_third_time(audio, make_manifest, tmp_path):
    out, manifest = tmp_path / "feats", make_manifest(audio[:5])
    assert run_build(out, manifest, META_A)["computed"] == 5
    b = run_build(out, manifest, META_B)
    assert (b["computed"], b["reused"], b["removed"]) == (5, 0, 0)
    assert view(out)["store"] == identity_slug(identity_of(META_B))
    assert_holds(out, audio[:5], META_B)
    shards_a = snapshot(out / identity_slug(identity_of(META_A)))
    a = run_build(out, manifest, {**META_A, "versions": {"numpy": "another"}})  # run keys are not the identity
    assert (a["computed"], a["reused"], a["stored"]) == (0, 5, 5)
    assert view(out)["store"] == identity_slug(identity_of(META_A))
    assert snapshot(out / identity_slug(identity_of(META_A))) == shards_a
    assert_holds(out, audio[:5], META_A)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        identity_slug(identity_of(m)) for m in (META_A, META_B))


def test_changed_audio_gets_a_new_entry_and_reverted_audio_reuses_the_old(audio, make_manifest, tmp_path,
                                                                          write_audio):
    out, manifest = tmp_path / "feats", make_manifest(audio[:3])
    run_build(out, manifest)
    original = audio[0].read_bytes()
    old_shards = snapshot(out)
    write_audio(audio[0], seconds=0.7, seed=99)  # the file changes under the same id
    changed = run_build(out, manifest)
    assert (changed["computed"], changed["reused"], changed["removed"], changed["stored"]) == (1, 2, 0, 3)
    assert all(snapshot(out)[k] == v for k, v in old_shards.items() if "/shards/" in k)
    assert_holds(out, audio[:3])
    (store,) = [p for p in out.iterdir() if p.is_dir()]
    with FeatureStore(store) as fs:  # the identity store: the newest entry of each utterance
        np.testing.assert_array_equal(fs.all_frames("synth/s0/u0"), features_of(str(audio[0]), META_A))

    audio[0].write_bytes(original)
    reverted = run_build(out, manifest)
    assert (reverted["computed"], reverted["reused"]) == (0, 3)
    assert_holds(out, audio[:3])


def _worker(part: str, paths: list[str], sources: list[str]) -> str | None:
    writer = PartWriter(part, META_A)
    for path, source in zip(paths, sources, strict=True):
        writer.add(f"synth/{Path(path).parent.name}/{Path(path).stem}", source=source,
                   frames=features_of(path, META_A), path=path)
    written = writer.close()
    return None if written is None else str(written)


def test_worker_processes_publish_shards_the_parent_absorbs(audio, make_manifest, tmp_path):
    out = tmp_path / "feats"
    build = StoreBuild(out, META_A)
    todo, _ = build.plan(read_manifests([make_manifest(audio)], keep_default_na=False))
    halves = [todo.iloc[:4], todo.iloc[4:]]
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        futures = [pool.submit(_worker, str(build.reserve_part()), list(h["path"]), list(h["source"]))
                   for h in halves]
        for future in futures:
            build.absorb(future.result())
    assert build.finish() == {"stored": 8, "removed": 0, "corrupt": 0}
    assert len(shard_files(out)) == 2 and not list(out.rglob("*.tmp-*"))
    assert_holds(out, audio)
    with pytest.raises(ValueError, match="expected a shard of"):
        build.absorb(tmp_path / "elsewhere.h5")


def test_killed_build_resumes_to_an_uninterrupted_one(audio, make_manifest, tmp_path):
    out, manifest = tmp_path / "killed" / "feats", make_manifest(audio)
    run_build(out, make_manifest(audio[:2], name="first.csv"))
    before = snapshot(out)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_cache as t; "
            "t.run_build(sys.argv[2], sys.argv[3], kill_after=3)")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(out), str(manifest)],
                          cwd=Path(__file__).parents[2], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(shard_files(out)) == 2  # the first run's shard and the killed run's first one (2 entries) ...
    assert not list(out.rglob("*.h5.tmp-*"))  # ... its second was built in memory: nothing half-written on disk
    assert {k: v for k, v in snapshot(out).items() if "tmp" not in k and "/shards/" not in k} == \
        {k: v for k, v in before.items() if "/shards/" not in k}  # the old view, untouched
    with FeatureStore(out) as fs:
        assert len(fs) == 2

    resumed = run_build(out, manifest)
    assert (resumed["computed"], resumed["reused"], resumed["stored"]) == (4, 4, 8)
    assert not list(out.rglob("*.tmp-*"))  # the dead process's debris is gone
    clean = tmp_path / "clean" / "feats"
    run_build(clean, manifest)
    assert view(clean) == view(out)
    with FeatureStore(out) as a, FeatureStore(clean) as b:
        assert a.ids() == b.ids()
        for uid in a.ids():
            np.testing.assert_array_equal(a.all_frames(uid), b.all_frames(uid))
            np.testing.assert_array_equal(a.pooled(uid), b.pooled(uid))


def test_damaged_entry_is_recomputed_and_counted(audio, make_manifest, tmp_path, capsys, corrupt_frames):
    out, manifest = tmp_path / "feats", make_manifest(audio[:4])
    run_build(out, manifest)
    shard = shard_files(out)[0]
    stat = shard.stat()
    corrupt_frames(shard, "synth/s0/u0")
    if shard.stat().st_mtime_ns == stat.st_mtime_ns:  # a coarse file clock; a real fault comes later
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    with FeatureStore(out) as fs, pytest.raises(OSError, match="synth/s0/u0.*damaged"):
        fs.all_frames("synth/s0/u0")

    capsys.readouterr()
    summary = run_build(out, manifest)
    assert (summary["computed"], summary["reused"], summary["corrupt"], summary["stored"]) == (1, 3, 1, 4)
    printed = capsys.readouterr()
    assert "1 corrupt" in printed.out and shard.name in printed.err
    assert_holds(out, audio[:4])  # the view reads the recomputed entry
    files = snapshot(out)
    again = run_build(out, manifest)
    assert (again["computed"], again["corrupt"]) == (0, 0) and snapshot(out) == files


def test_out_must_be_a_collection_folder(tmp_path, make_manifest, audio):
    (tmp_path / "old.h5").write_bytes(b"\x89HDF\r\n")
    with pytest.raises(ValueError, match="found a file.*another --out"):
        run_build(tmp_path / "old.h5", make_manifest(audio[:1]))
    out = tmp_path / "feats"
    run_build(out, make_manifest(audio[:1]))
    (store,) = [p for p in out.iterdir() if p.is_dir()]
    with pytest.raises(ValueError, match=f"identity store.*--out {out}"):
        run_build(store, make_manifest(audio[:1]))


def test_a_dead_writers_temporary_shard_is_deleted_by_the_next_build(audio, make_manifest, tmp_path):
    out, manifest = tmp_path / "feats", make_manifest(audio[:2])
    run_build(out, manifest)
    shards = shard_files(out)[0].parent
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, pid = writer_tag().rsplit(".", 1)[0], dead.stdout.strip()
    debris = shards / f"{shard_files(out)[0].name}.tmp-{host}.{pid}"  # killed while writing its image
    debris.write_bytes(b"half an HDF5 image")
    older = shards / f"old.h5.tmp-{pid}"  # named by an earlier version: pid only
    older.write_bytes(b"half an HDF5 image")
    live = shards / f"other.h5.tmp-{writer_tag()}"  # a live writer's file is left alone
    live.write_bytes(b"being written")
    elsewhere = shards / f"remote.h5.tmp-{host}x.{pid}"  # another machine's writer on a shared filesystem:
    elsewhere.write_bytes(b"being written")  # its pid means nothing here
    assert run_build(out, manifest)["computed"] == 0
    assert not debris.exists() and not older.exists() and live.exists() and elsewhere.exists()

def test_the_skips_report_clears_a_dead_writers_half_report_and_nothing_else(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, pid = writer_tag().rsplit(".", 1)[0], dead.stdout.strip()
    report = tmp_path / "feats.skips.csv"
    debris = tmp_path / f"feats.skips.csv.tmp-{host}.{pid}"  # a run killed while writing its report
    debris.write_text("id,pa")
    other = tmp_path / f"notes.csv.tmp-{host}.{pid}"  # beside it, not the report's: left alone
    other.write_text("x")
    write_skips(report, [{"id": "a", "path": "a.wav", "reason": "missing", "detail": "gone"}])
    assert not debris.exists() and other.exists() and "missing" in report.read_text()


def test_the_skips_report_of_a_rerun_skipping_the_same_rows_in_another_order_is_not_rewritten(tmp_path):
    """Rows are skipped in the order tasks finish; the report is sorted, so a rerun that does nothing writes nothing."""
    report = tmp_path / "feats.skips.csv"
    rows = [{"id": f"c/{name}", "path": f"{name}.wav", "reason": "unreadable", "detail": "?"} for name in "bca"]
    write_skips(report, rows)
    before = report.stat()
    write_skips(report, rows[::-1])
    after = report.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [line.split(",")[0] for line in report.read_text().splitlines()[1:]] == ["c/a", "c/b", "c/c"]


def test_an_unreadable_shard_no_index_describes_is_reported_and_its_rows_recomputed(audio, make_manifest, tmp_path,
                                                                                   capsys):
    out, manifest = tmp_path / "feats", make_manifest(audio[:4])
    run_build(out, manifest)  # two shards of two entries
    broken = shard_files(out)[0]
    (broken.parent.parent / "index.json").unlink()  # as if the run had been killed before writing its index
    broken.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))  # ... and the shard damaged since
    capsys.readouterr()
    summary = run_build(out, manifest)
    assert (summary["computed"], summary["reused"]) == (2, 2)
    said = capsys.readouterr().err
    assert f"{broken} cannot be read, and no index says what it held" in said and "Delete the file" in said
    index = json.loads((broken.parent.parent / "index.json").read_text())
    assert broken.name not in index  # not recorded as an empty shard: found and reported again next time
    assert_holds(out, audio[:4])
    run_build(out, manifest)
    assert f"{broken} cannot be read" in capsys.readouterr().err


def test_shards_checksum_their_own_metadata(audio, make_manifest, tmp_path):
    out = tmp_path / "feats"
    run_build(out, make_manifest(audio[:2]))
    image = shard_files(out)[0].read_bytes()
    assert image[:8] == b"\x89HDF\r\n\x1a\n" and image[8] >= 2  # superblock version 2+: checksummed metadata
