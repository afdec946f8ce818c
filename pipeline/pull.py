"""Stage ``pull``: find or fetch each enabled corpus, and record where it lies.

Usage::

    python -m pipeline.pull --enabled ravdess [tess ...] [--sources.ravdess PATH] --out data/corpora.json

For each corpus the first of these wins:

1. ``--sources.NAME PATH`` (params.yaml ``corpora.sources``): a local folder, or an archive to extract;
2. ``$SER_CORPORA_DIR/NAME``: a folder of local copies, one subfolder per corpus;
3. an earlier download already extracted under ``--data-dir`` (default ``data/raw``);
4. a download from the official source, with a progress bar, resume (HTTP range), size and checksum
   checks where known, and extraction that refuses members escaping the target folder.

SAVEE needs registration on its site, so it is manual: give a local copy. Offline with no local copy,
the stage stops with a message saying what to provide. ``kagglehub`` is tried only where it is
installed and Kaggle credentials exist, and only after the official source failed.

The output JSON maps each corpus to ``root`` (its folder), ``origin``, and a fingerprint of its files,
so the manifest stage re-runs when a corpus changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.cli import output_dir, output_file, run_main
from pipeline.corpora import CORPORA
from pipeline.manifest import walk_files


@dataclass(frozen=True)
class Source:
    """Where a corpus comes from. ``urls`` maps file names to download addresses."""

    urls: dict[str, str] = field(default_factory=dict)
    size: dict[str, int] = field(default_factory=dict)
    md5: dict[str, str] = field(default_factory=dict)
    manual: str = ""
    kaggle: str = ""
    zenodo_record: str = ""


SOURCES: dict[str, Source] = {
    "ravdess": Source(
        urls={"Audio_Speech_Actors_01-24.zip":
              "https://zenodo.org/records/1188976/files/Audio_Speech_Actors_01-24.zip?download=1"},
        size={"Audio_Speech_Actors_01-24.zip": 208_468_073},
        md5={"Audio_Speech_Actors_01-24.zip": "bc696df654c87fed845eb13823edef8a"},
        zenodo_record="1188976", kaggle="uwrfkaggler/ravdess-emotional-speech-audio"),
    "emodb": Source(urls={"download.zip": "http://emodb.bilderbar.info/download/download.zip"},
                    kaggle="piyushagni5/berlin-database-of-emotional-speech-emodb"),
    "tess": Source(
        urls={"tess.zip": "https://borealisdata.ca/api/access/dataset/:persistentId/"
                          "?persistentId=doi:10.5683/SP2/E8H2MF"},
        kaggle="ejlok1/toronto-emotional-speech-set-tess"),
    "cremad": Source(
        urls={"AudioWAV.zip": "https://gitlab.com/cs-cooper-lab/crema-d-mirror/-/archive/main/"
                              "crema-d-mirror-main.zip?path=AudioWAV",
              "VideoDemographics.csv": "https://gitlab.com/cs-cooper-lab/crema-d-mirror/-/raw/main/"
                                       "VideoDemographics.csv"},
        kaggle="ejlok1/cremad"),
    "savee": Source(manual="SAVEE is distributed after registration at http://kahlan.eps.surrey.ac.uk/savee/ ; "
                           "download AudioData and give its folder", kaggle="ejlok1/surrey-audiovisual-expressed-emotion-savee"),
}
ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def _marker(target: Path) -> Path:
    """The file beside an extracted corpus that says where it came from (absent: incomplete)."""
    return target.with_name(target.name + ".complete")


def is_archive(path: Path) -> bool:
    return path.is_file() and (zipfile.is_zipfile(path) or tarfile.is_tarfile(path))


def _inside(target: Path, name: str) -> bool:
    dest = (target / name).resolve()
    return dest == target.resolve() or target.resolve() in dest.parents


def safe_extract(archive: Path, target: Path) -> Path:
    """Extract a zip or tar archive into ``target``, refusing any member that would land outside it.

    Extraction goes to a temporary sibling folder that is renamed on success, so an interrupted run
    leaves no half-extracted corpus behind.

    Raises:
        ValueError: a member with an absolute path, ``..`` escape or a link pointing outside ``target``.
    """
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    if not _inside(tmp, name):
                        raise ValueError(f"{archive}: member {name!r} would be written outside {target}; "
                                         "refusing to extract an unsafe archive.")
                zf.extractall(tmp)
        else:
            with tarfile.open(archive) as tf:
                for member in tf.getmembers():
                    link_ok = not (member.issym() or member.islnk()) or _inside(
                        tmp, str(Path(member.name).parent / member.linkname) if member.issym() else member.linkname)
                    if not _inside(tmp, member.name) or not link_ok or member.isdev():
                        raise ValueError(f"{archive}: member {member.name!r} would be written outside {target} "
                                         "(or is a device); refusing to extract an unsafe archive.")
                tf.extractall(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _zenodo_md5(record: str, name: str) -> str | None:
    """The checksum Zenodo publishes for a file of a record, or ``None`` when unreachable."""
    try:
        with urllib.request.urlopen(f"https://zenodo.org/api/records/{record}", timeout=30) as resp:
            files = json.load(resp).get("files", [])
    except (OSError, ValueError):
        return None
    for entry in files:
        if entry.get("key") == name and str(entry.get("checksum", "")).startswith("md5:"):
            return entry["checksum"][4:]
    return None


def download(url: str, dest: Path, *, size: int | None = None, md5: str | None = None) -> Path:
    """Download ``url`` to ``dest`` with resume, progress, and size/checksum verification.

    Raises:
        OSError: the download failed (offline, refused); the partial file is kept for resuming.
        ValueError: size or checksum differ from the expected ones.
    """
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    with urllib.request.urlopen(request, timeout=60) as resp:
        if done and resp.status != 206:
            done = 0  # the server ignored the range: start again
        total = int(resp.headers.get("Content-Length") or 0) + done or None
        with open(part, "ab" if done else "wb") as handle, tqdm(
                total=total, initial=done, unit="B", unit_scale=True, desc=dest.name) as bar:
            for block in iter(lambda: resp.read(1 << 20), b""):
                handle.write(block)
                bar.update(len(block))
    if size is not None and part.stat().st_size != size:
        raise ValueError(f"{dest.name}: downloaded {part.stat().st_size} bytes, expected {size}. "
                         f"Delete {part} and run again.")
    if md5 is not None and (found := _md5(part)) != md5:
        raise ValueError(f"{dest.name}: md5 {found}, expected {md5}. The download is corrupt or the source "
                         f"changed; delete {part} and run again, or give a verified local copy.")
    part.rename(dest)
    return dest


def _kaggle(name: str, target: Path) -> Path | None:
    """Fetch through kagglehub when it is installed and credentials exist; ``None`` otherwise."""
    has_credentials = os.environ.get("KAGGLE_KEY") or any(
        (Path.home() / p / "kaggle.json").exists() for p in (".kaggle", ".config/kaggle"))
    if not (SOURCES[name].kaggle and has_credentials):
        return None
    try:
        import kagglehub
    except ImportError:
        return None
    return Path(kagglehub.dataset_download(SOURCES[name].kaggle))


def fetch(name: str, data_dir: Path) -> Path:
    """Download and extract a corpus into ``data_dir/NAME`` (reusing what is already there)."""
    source, target = SOURCES[name], data_dir / name
    if _marker(target).exists():
        return target
    if source.manual:
        raise FileNotFoundError(f"{name}: {source.manual}. Then set SER_CORPORA_DIR to a folder holding {name}/, "
                                f"or params.yaml corpora.sources.{name}: PATH (folder or archive).")
    downloads = data_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    try:
        files = []
        for filename, url in source.urls.items():
            md5 = source.md5.get(filename)
            if source.zenodo_record:
                md5 = _zenodo_md5(source.zenodo_record, filename) or md5
            files.append(download(url, downloads / filename, size=source.size.get(filename), md5=md5))
    except OSError as err:
        if (kaggle := _kaggle(name, target)) is not None:
            return kaggle
        raise FileNotFoundError(
            f"{name}: cannot download from {next(iter(source.urls.values()))} ({err}). Offline? Provide a local copy: "
            f"set SER_CORPORA_DIR to a folder holding {name}/, or params.yaml corpora.sources.{name}: PATH "
            "(a folder or the official archive).") from err
    staging = data_dir / f"{name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in files:
        if is_archive(path):
            safe_extract(path, staging / path.stem)
        else:
            shutil.copy2(path, staging / path.name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    _marker(target).write_text("download\n")
    return target


def locate(name: str, *, source: str | None, corpora_dir: str | None, data_dir: Path) -> tuple[Path, str]:
    """Where corpus ``name`` lies, fetching it if needed; returns ``(root, origin)``."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {sorted(CORPORA)}.")
    if source:
        path = Path(source).expanduser()
        if path.is_dir():
            return path, "local folder"
        if is_archive(path):
            target, stamp = data_dir / name, f"{path.resolve()} {path.stat().st_size} {path.stat().st_mtime_ns}\n"
            if not _marker(target).exists() or _marker(target).read_text() != stamp:
                _marker(target).unlink(missing_ok=True)
                safe_extract(path, target)
                _marker(target).write_text(stamp)
            return target, f"local archive {path}"
        raise FileNotFoundError(f"{name}: source {path} is neither a folder nor an archive (zip or tar); "
                                "expected a local copy of the corpus.")
    if corpora_dir and (Path(corpora_dir) / name).is_dir():
        return Path(corpora_dir) / name, "SER_CORPORA_DIR"
    return fetch(name, data_dir), "download"


def fingerprint(root: Path) -> dict:
    """Count, size and a digest of ``(relative path, size, mtime)`` of every file under ``root``, walked as the
    manifest walks it (:func:`pipeline.manifest.walk_files`: folder links followed, each folder once), and of what
    that walk cannot list (a dangling link, an unreadable folder): the manifest stage reruns whenever what it would
    read changes, and a damaged entry is the manifest's counted reject, not the end of this stage."""
    digest, count, total = hashlib.sha256(), 0, 0
    files, problems = walk_files(Path(root))
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        count, total = count + 1, total + stat.st_size
    for problem in problems:
        digest.update(f"{problem['reason']}\0{os.path.relpath(problem['path'], root)}\n".encode())
    return {"files": count, "bytes": total, "sha256": digest.hexdigest()}


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.pull", description=__doc__.split("\n")[0])
    parser.add_argument("--enabled", "--corpora", nargs="+", required=True, help="corpora to make available")
    for name in CORPORA:
        parser.add_argument(f"--sources.{name}", dest=f"source_{name}", metavar="PATH",
                            help=f"local folder or archive of {name}")
    parser.add_argument("--data-dir", default="data/raw", type=output_dir, help="where downloads and extractions go")
    parser.add_argument("--out", required=True, type=output_file, help="JSON mapping each corpus to its folder")
    args = parser.parse_args(argv)
    corpora_dir = os.environ.get("SER_CORPORA_DIR")
    found = {}
    try:
        for name in args.enabled:
            root, origin = locate(name, source=getattr(args, f"source_{name}", None), corpora_dir=corpora_dir,
                                  data_dir=Path(args.data_dir))
            found[name] = {"root": str(root.resolve()), "origin": origin, **fingerprint(root)}
            print(f"{name}: {found[name]['files']} files in {found[name]['root']} ({origin})", file=sys.stderr)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(found, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
