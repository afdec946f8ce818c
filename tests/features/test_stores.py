"""``python -m features.stores``: list identity stores, remove unused ones, refuse what must stay."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.cache import StoreBuild
from features.store import DEFAULT_ATTRS, FeatureStore, identity_of, identity_slug, write_store
from features.stores import main

ENC_A = {"kind": "wav2vec2", "encoder": "org/enc-a", "layers": [0, 1, 2]}
ENC_B = {**ENC_A, "encoder": "org/enc-b", "dtype": "bfloat16"}
EGEMAPS = {"kind": "egemaps", "encoder": "opensmile/eGeMAPSv02", "layers": [0]}


def entries(n: int, layers: int = 3) -> dict:
    rng = np.random.default_rng(n)
    return {f"c/u{i}": (rng.standard_normal((layers, 5, 4)).astype(np.float32), None) for i in range(n)}


def slug(attrs: dict) -> str:
    return identity_slug(identity_of({**DEFAULT_ATTRS, **attrs}))


@pytest.fixture
def root(tmp_path):
    """``features/``: collection w2v.h5 switched from encoder A to B (A unused), egemaps.h5 with one store."""
    root = tmp_path / "features"
    write_store(root / "w2v.h5", entries(3), ENC_A)
    write_store(root / "w2v.h5", entries(2), ENC_B)
    write_store(root / "egemaps.h5", entries(4, layers=1), EGEMAPS)
    return root


def test_list_shows_every_store_and_which_are_current(root, capsys):
    assert main(["list", str(root)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.lstrip().startswith(str(root))}
    a, b, e = (str(root / c / slug(s)) for c, s in (("w2v.h5", ENC_A), ("w2v.h5", ENC_B), ("egemaps.h5", EGEMAPS)))
    assert set(lines) == {a, b, e}
    assert lines[a][1:6] == ["wav2vec2", "org/enc-a", "float32", "0-2", "3"] and lines[a][-1] == "no"
    assert lines[b][1:6] == ["wav2vec2", "org/enc-b", "bfloat16", "0-2", "2"] and lines[b][-1] == "yes"
    assert lines[e][1:6] == ["egemaps", "opensmile/eGeMAPSv02", "float32", "0", "4"] and lines[e][-1] == "yes"
    assert "3 stores" in out and "2 current, 1 unused" in out
    assert f"collection {root / 'w2v.h5'}: current store {slug(ENC_B)}, 2 entries" in out


def test_remove_unused_dry_run_then_for_real(root, capsys):
    unused = root / "w2v.h5" / slug(ENC_A)
    assert main(["remove", "--unused", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {unused} (" in out and "in all" in out and unused.is_dir()
    assert main(["remove", "--unused", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"removed {unused} (" in out and not unused.exists()
    assert sorted(p.name for p in (root / "w2v.h5").iterdir()) == ["current.json", slug(ENC_B)]
    with FeatureStore(root / "w2v.h5") as fs, FeatureStore(root / "egemaps.h5") as eg:  # the current ones stay
        assert len(fs) == 2 and len(eg) == 4
    assert main(["remove", "--unused", str(root)]) == 0
    assert "no unused stores" in capsys.readouterr().out


def test_remove_one_store_and_refusals(root, capsys):
    current, unused = root / "w2v.h5" / slug(ENC_B), root / "w2v.h5" / slug(ENC_A)
    assert main(["remove", str(current)]) == 1
    assert "is the current store of" in capsys.readouterr().err and current.is_dir()
    build = StoreBuild(root / "w2v.h5", {**DEFAULT_ATTRS, **ENC_A})
    assert build.store_dir == unused
    build.plan(pd.DataFrame(columns=["id", "path"]))  # a build is using the unused store
    assert main(["remove", str(unused)]) == 1
    assert "an extraction or a reader (training, prediction) is using it" in capsys.readouterr().err and unused.is_dir()
    assert main(["remove", "--unused", str(root)]) == 1 and unused.is_dir()
    build.finish()  # now it is the current one
    assert json.loads((root / "w2v.h5" / "current.json").read_text())["store"] == unused.name
    assert main(["remove", str(current)]) == 0
    assert f"removed {current}" in capsys.readouterr().out and not current.exists()


def test_an_open_reader_keeps_its_store(root, capsys):
    unused = root / "w2v.h5" / slug(ENC_A)
    with FeatureStore(unused) as fs:  # training reading the old encoder's store while the collection moved on
        assert main(["remove", "--unused", str(root)]) == 1
        assert "a reader (training, prediction) is using it" in capsys.readouterr().err
        assert len(fs) == 3 and fs.all_frames(fs.ids()[0]).shape == (3, 5, 4)
    assert main(["remove", "--unused", str(root)]) == 0 and not unused.exists()


def test_a_dry_run_says_a_store_in_use_would_not_go(root, capsys):
    unused = root / "w2v.h5" / slug(ENC_A)
    with FeatureStore(unused):
        assert main(["remove", str(unused), "--dry-run"]) == 1
        assert "is using it" in capsys.readouterr().err
    assert main(["remove", str(unused), "--dry-run"]) == 0 and unused.is_dir()


def test_only_feature_stores_and_their_own_debris_are_removed(root, tmp_path, capsys):
    notes = root / "my-notes"
    notes.mkdir()
    (notes / "store.json").write_text('{"shop": "groceries"}')  # a user's folder that happens to hold the name
    (notes / "thesis.txt").write_text("mine")
    for name in ("old.removing-later", ".x.removing-notapid"):
        (root / name).mkdir()
    thesis = root / ".thesis.removing-999999"  # named like debris, but a user's folder
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("mine")
    debris = root / ".old.removing-999998"  # a removal killed part-way: shards already gone
    debris.mkdir()
    (debris / "store.json").write_text("{}")
    link = root / "link-to-unused"
    link.symlink_to(root / "w2v.h5" / slug(ENC_A), target_is_directory=True)
    assert main(["remove", str(link)]) == 1 and "a symbolic link to" in capsys.readouterr().err
    assert main(["remove", "--unused", str(root)]) == 1
    said = capsys.readouterr()
    assert "my-notes/store.json: expected a store description of format" in said.err
    assert (notes / "thesis.txt").is_file() and (root / "old.removing-later").is_dir()
    assert (root / ".x.removing-notapid").is_dir() and not (root / "w2v.h5" / slug(ENC_A)).exists()
    assert (thesis / "chapter1.tex").is_file() and not debris.exists()
    assert main(["remove", str(notes)]) == 1 and notes.is_dir()


def test_shards_not_yet_indexed_are_kept_by_remove_unused(root, capsys):
    unused = root / "w2v.h5" / slug(ENC_A)
    (unused / "index.json").unlink()  # as a --shard member or a killed run leaves its shards
    assert main(["remove", "--unused", str(root)]) == 0
    assert f"kept {unused}: 1 shards not yet indexed" in capsys.readouterr().out and unused.is_dir()
    assert main(["remove", str(unused)]) == 0 and not unused.exists()  # by name: discarded


def test_a_damaged_view_keeps_its_stores_listed(root, capsys):
    (root / "w2v.h5" / "current.json").write_text("{")
    assert main(["list", str(root)]) == 1
    out = capsys.readouterr().out
    assert str(root / "w2v.h5" / slug(ENC_A)) in out and "unknown" in out and "3 stores" in out


def test_a_store_that_becomes_current_while_being_removed_is_kept(root, capsys, monkeypatch):
    import features.stores

    unused, size = root / "w2v.h5" / slug(ENC_A), features.stores.dir_size

    def a_run_finishes_meanwhile(path):  # between the first check and the lock
        write_store(root / "w2v.h5", entries(3), ENC_A)
        return size(path)

    monkeypatch.setattr(features.stores, "dir_size", a_run_finishes_meanwhile)
    assert main(["remove", str(unused)]) == 1
    assert "became the current store" in capsys.readouterr().err and unused.is_dir()
    with FeatureStore(root / "w2v.h5") as fs:
        assert len(fs) == 3


def test_a_build_whose_store_is_removed_before_it_locks_it_makes_it_again(root, monkeypatch):
    import features.cache

    hold, removed = features.cache.hold_store, []

    def removed_first(store_dir):
        if not removed:  # `remove` renamed it aside just before this build locked it
            assert main(["remove", str(store_dir)]) == 0
            removed.append(store_dir)
        return hold(store_dir)

    monkeypatch.setattr(features.cache, "hold_store", removed_first)
    build = StoreBuild(root / "w2v.h5", {**DEFAULT_ATTRS, **ENC_A})
    todo, _ = build.plan(pd.DataFrame(columns=["id", "path"]))
    assert removed == [build.store_dir] and build.store_dir.is_dir()
    build.finish()
    with FeatureStore(root / "w2v.h5") as fs:
        assert fs.attrs["encoder"] == "org/enc-a" and len(fs) == 0


def test_bad_usage_exits_2_and_bad_data_exits_1(root, tmp_path, capsys):
    for argv in (["list", str(tmp_path / "nowhere")], ["remove"], ["remove", str(root / "w2v.h5")], ["frob"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
    assert "expected an identity store" in capsys.readouterr().err
    (root / "egemaps.h5" / "current.json").write_text("{")
    assert main(["list", str(root)]) == 1
    assert "error:" in capsys.readouterr().err
    assert main(["remove", "--unused", str(root)]) == 1  # an unreadable view: its stores are kept
    assert (root / "egemaps.h5" / slug(EGEMAPS)).is_dir()


def test_command_line_entry_point(root):
    proc = subprocess.run([sys.executable, "-m", "features.stores", "remove", "--unused", str(root), "--dry-run"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0 and "would remove" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "features.stores", "remove", str(root)],
                          capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
