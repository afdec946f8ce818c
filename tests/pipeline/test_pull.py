import io
import json
import tarfile
import zipfile

import pytest

from pipeline.pull import locate, main, safe_extract


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("evil", ["../escape.wav", "/abs/escape.wav", "a/../../escape.wav"])
def test_zip_member_escaping_target_is_refused(tmp_path, evil):
    archive = _zip(tmp_path / "evil.zip", {"ok/a.wav": b"x", evil: b"x"})
    with pytest.raises(ValueError, match="outside"):
        safe_extract(archive, tmp_path / "out" / "corpus")
    assert not (tmp_path / "out" / "corpus").exists() and not (tmp_path / "escape.wav").exists()
    assert not (tmp_path / "out" / "corpus.partial").exists()


def test_tar_symlink_escaping_target_is_refused(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        link = tarfile.TarInfo("corpus/link")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        tf.addfile(link)
    with pytest.raises(ValueError, match="outside"):
        safe_extract(archive, tmp_path / "out")


def test_safe_archive_extracts(tmp_path):
    archive = tmp_path / "good.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("Actor_01/03-01-01-01-01-01-01.wav")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    target = safe_extract(archive, tmp_path / "ravdess")
    assert (target / "Actor_01" / "03-01-01-01-01-01-01.wav").read_bytes() == b"abc"


def test_local_sources_win_over_download(tmp_path, monkeypatch, ravdess_dir):
    root = ravdess_dir(actors=(1,))
    assert locate("ravdess", source=str(root), corpora_dir=None, data_dir=tmp_path / "raw") == (root, "local folder")
    assert locate("ravdess", source=None, corpora_dir=str(root.parent), data_dir=tmp_path / "raw")[1] == "SER_CORPORA_DIR"
    archive = _zip(tmp_path / "Audio_Speech_Actors_01-24.zip", {"Actor_01/03-01-01-01-01-01-01.wav": b"x"})
    target, origin = locate("ravdess", source=str(archive), corpora_dir=None, data_dir=tmp_path / "raw")
    assert origin.startswith("local archive") and (target / "Actor_01").is_dir()


def test_offline_without_copy_says_what_to_provide(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    monkeypatch.delenv("SER_CORPORA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="SER_CORPORA_DIR"):
        locate("emodb", source=None, corpora_dir=None, data_dir=tmp_path / "raw")
    with pytest.raises(FileNotFoundError, match="registration"):
        locate("savee", source=None, corpora_dir=None, data_dir=tmp_path / "raw")
    assert main(["--enabled", "emodb", "--out", str(tmp_path / "c.json"), "--data-dir", str(tmp_path / "raw")]) == 2


def test_cli_records_roots_and_fingerprints(tmp_path, monkeypatch, ravdess_dir):
    root = ravdess_dir(actors=(1,))
    monkeypatch.setenv("SER_CORPORA_DIR", str(root.parent))
    out = tmp_path / "c.json"
    assert main(["--enabled", "ravdess", "--out", str(out)]) == 0
    first = json.loads(out.read_text())["ravdess"]
    assert first["files"] == 8 and first["origin"] == "SER_CORPORA_DIR"
    (root / "Actor_01" / "extra.txt").write_text("new")
    assert main(["--enabled", "ravdess", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["ravdess"]["sha256"] != first["sha256"]


def test_the_fingerprint_sees_what_the_manifest_reads(tmp_path):
    """Files behind a folder link change it (the manifest reads them); a dangling link is counted, not a crash."""
    from pipeline.pull import fingerprint

    root, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere" / "Actor_01"
    elsewhere.mkdir(parents=True)
    (elsewhere / "a.wav").write_bytes(b"x")
    root.mkdir()
    (root / "Actor_01").symlink_to(elsewhere)
    before = fingerprint(root)
    assert before["files"] == 1
    (elsewhere / "b.wav").write_bytes(b"y")  # added behind the link
    after = fingerprint(root)
    assert after["files"] == 2 and after["sha256"] != before["sha256"]
    (root / "gone.wav").symlink_to(tmp_path / "nowhere.wav")
    assert fingerprint(root)["sha256"] != after["sha256"]
