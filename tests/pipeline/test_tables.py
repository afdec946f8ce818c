"""pipeline.tables: manifests and splits that are damaged or foreign are named, not a KeyError traceback."""

from __future__ import annotations

import pytest

from pipeline.experiment import MANIFEST_COLUMNS
from pipeline.roots import read_manifests
from pipeline.split import main as split_main
from pipeline.split import read_split


def test_manifest_without_the_columns_trainers_read_is_named(tmp_path):
    (tmp_path / "m.csv").write_text("id,foo\na,1\n")
    with pytest.raises(ValueError, match=r"m.csv: the manifest lacks columns \['path', 'corpus', 'speaker', "
                                         r"'emotion'\] \(found \['id', 'foo'\]\)"):
        read_manifests([tmp_path / "m.csv"], required=MANIFEST_COLUMNS)


def test_binary_garbage_as_a_split_is_named(tmp_path):
    (tmp_path / "s.csv").write_bytes(b"\x00\x01garbage\xff\n")
    with pytest.raises(ValueError, match=r"s.csv: cannot be read as a split CSV"):
        read_split(tmp_path / "s.csv")


def test_damaged_split_sidecar_is_named(tmp_path):
    (tmp_path / "s.csv").write_text("fold,id,partition\n0,a,train\n")
    (tmp_path / "s.json").write_text('{"scheme": ')
    with pytest.raises(ValueError, match=r"s.json is not valid JSON"):
        read_split(tmp_path / "s.csv")


def test_a_split_with_an_id_twice_in_one_fold_is_refused(tmp_path):
    """Trainers would fit on the repeats, and the run would then be refused by compare as damaged."""
    (tmp_path / "s.csv").write_text("fold,id,partition\n0,a,train\n0,b,test\n0,a,test\n1,a,train\n")
    with pytest.raises(ValueError, match=r"once per fold, found 1 repeated \(e.g. id 'a' in fold 0, partitions "
                                         r"\['test', 'train'\]\)"):
        read_split(tmp_path / "s.csv")


def test_split_command_line_ends_in_one_error_line(tmp_path, capsys):
    (tmp_path / "m.csv").write_bytes(b"\xff\xfe\x00garbage")
    assert split_main(["--manifest", str(tmp_path / "m.csv"), "--scheme", "speaker_kfold",
                       "--out", str(tmp_path / "s.csv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot be read as a manifest CSV" in err
    assert not (tmp_path / "s.csv").exists()
