"""Stage ``manifest``: turn corpus folders into one table of utterances, and a table of every file not used.

Usage::

    python -m pipeline.manifest --corpus ravdess --root DIR --out manifest.csv [--rejects rejects.csv]
    python -m pipeline.manifest --sources data/corpora.json --out data/manifest.csv --rejects data/rejects.csv

Paths in the manifest (and the rejects) are relative to their corpus's root, which is recorded once beside it
(``manifest.roots.json``); ``pipeline.roots.read_manifest`` resolves them. So the manifest, and every ``dvc.lock`` hash
downstream of it, is the same in two clones of the project at different paths.

Each file under a root is either a manifest row or a rejects row (``path, corpus, reason, detail``). Reasons:
``bad_name`` (outside the corpus's naming convention, or not UTF-8), ``not_speech`` (song, video), ``empty`` (zero bytes),
``not_audio`` / ``unreadable`` / ``corrupt`` / ``no_samples`` (libsndfile cannot decode it, or no permission
to read it), ``truncated`` (less data than the header announces), ``too_short`` (under ``pipeline.audio.MIN_SECONDS``),
``unreadable_folder``, ``dangling_link``, ``link_loop``, ``not_a_file`` (what the walk could not list), ``silent``
(all-zero samples), ``non_finite`` (NaN or infinite samples), ``duplicate`` (a second copy of an utterance
already listed, as in archives that nest the corpus twice). Headers are read in a thread pool; samples
are scanned only as far as needed (integer PCM stops at the first non-zero block).
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipeline.audio import MIN_SECONDS, AudioError, audio_info, check_complete, check_samples
from pipeline.cli import existing_file, non_negative_float, output_file, positive_int, run_main
from pipeline.corpora import CORPORA, NameRejected
from pipeline.outputs import write_files
from pipeline.roots import write_manifest

COLUMNS = ["id", "path", "corpus", "speaker", "gender", "emotion", "duration_s", "sample_rate", "channels"]
REJECT_COLUMNS = ["path", "corpus", "reason", "detail"]
#: Extensions that are never audio; a conforming name with one of these is rejected as ``not_audio``.
NOT_AUDIO = {".txt", ".csv", ".md", ".pdf", ".json", ".xml", ".html", ".htm", ".lab", ".lablaut", ".labsilb",
             ".silb", ".mp4", ".flv", ".avi", ".mov", ".mkv", ".zip", ".tar", ".gz", ".doc", ".docx", ".xls",
             ".xlsx", ".jpg", ".png", ".py"}
#: Lossless containers are preferred when one utterance exists twice (e.g. CREMA-D's WAV and MP3 copies).
_PREFERRED = {".wav": 0, ".flac": 0, ".aif": 0, ".aiff": 0}


def walk_files(root: Path) -> tuple[list[Path], list[dict]]:
    """Every regular file below ``root``, sorted, and a rejects row for everything that cannot be listed.

    Hidden folders are included and directory symlinks are followed, each real folder once: nothing is skipped
    unseen. Rows (``path, reason, detail``) are made for an unreadable folder (``unreadable_folder``), a link
    whose target is missing (``dangling_link``), a link that leads back into a folder already walked
    (``link_loop``; an ancestor, or a second link to the same folder), anything that is neither a file nor a
    folder (``not_a_file``: sockets, FIFOs, devices) and a file or folder whose name is not UTF-8 (``bad_name``).
    """
    files, problems = [], []

    def reject(path, reason: str, detail: str) -> None:
        problems.append({"path": shown(os.path.abspath(path)), "reason": reason, "detail": detail})

    def undecodable(path: Path) -> bool:  # a name of bytes that are not UTF-8 (manifests are UTF-8 CSV)
        if shown(path.name) == path.name:  # its own name: the manifest holds paths below the root only
            return False
        reject(path, "bad_name", f"{shown(path)}: the name is not valid UTF-8 (undecodable bytes shown as \\x..); "
               "expected UTF-8 file and folder names, as manifests are UTF-8 text. Rename it"
               f"{' (its files are not used meanwhile)' if path.is_dir() else ''}.")
        return True

    def unreadable(err: OSError) -> None:
        reject(err.filename or root, "unreadable_folder", f"{err.filename}: cannot list the folder ({err.strerror}); "
               "expected a readable folder, its files are not used. Fix its permissions.")

    seen = {}
    top = os.stat(root)
    seen[(top.st_dev, top.st_ino)] = str(root)
    for folder, dirs, names in os.walk(root, onerror=unreadable, followlinks=True):
        keep = []
        for name in sorted(dirs):
            path = Path(folder) / name
            if undecodable(path):
                continue
            st = os.stat(path)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                reject(path, "link_loop", f"{path}: leads to {seen[key]}, which is already walked; expected each "
                       "folder once. Remove the link (its files are listed once, under the first path).")
                continue
            seen[key] = str(path)
            keep.append(name)
        dirs[:] = keep
        for name in sorted(names):
            path = Path(folder) / name
            if undecodable(path):
                continue
            try:
                st = os.stat(path)
            except OSError as err:
                if os.path.islink(path) and err.errno == errno.ELOOP:
                    reject(path, "link_loop", f"{path}: the link points back to itself ({err.strerror}); expected "
                           "a link to an audio file. Remove or fix the link.")
                elif os.path.islink(path):
                    reject(path, "dangling_link", f"{path}: the link's target {os.readlink(path)!r} does not "
                           "exist; expected a link to an audio file. Fix or remove the link.")
                else:
                    reject(path, "unreadable", f"{path}: cannot stat it ({err.strerror}).")
                continue
            if stat.S_ISREG(st.st_mode):
                files.append(path)
            else:
                reject(path, "not_a_file", f"{path}: neither a file nor a folder (a socket, FIFO or device); "
                       "expected audio files only.")
    return files, problems


def shown(path) -> str:
    """``path`` as text that any UTF-8 file can hold: bytes of a name that are not UTF-8 (kept by Python as
    surrogates) become ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def list_files(root: Path) -> list[Path]:
    """Every regular file below ``root`` (see :func:`walk_files`, which also reports what could not be listed)."""
    return walk_files(root)[0]


def _inspect(path: Path, min_seconds: float = 0.0) -> tuple[dict | None, str | None, str | None]:
    """Read the header and scan the samples; returns (audio fields, reject reason, detail)."""
    if path.suffix.lower() in NOT_AUDIO:
        return None, "not_audio", f"{path.suffix} files are not audio"
    if not os.access(path, os.R_OK):
        return None, "unreadable", f"{path}: no permission to read it; expected a readable file. Fix its permissions."
    try:
        info = audio_info(path)
        check_complete(info)
        check_samples(info)
    except AudioError as err:
        return None, err.reason, str(err)
    except OSError as err:
        return None, "unreadable", f"{path}: cannot read it ({err.strerror or err})."
    if info.duration_s < min_seconds:
        return None, "too_short", (f"{path}: lasts {info.duration_s:.3f} s; expected at least {min_seconds} s "
                                   "(shorter clips give no eGeMAPS features and little to classify).")
    return {"duration_s": round(info.duration_s, 6), "sample_rate": info.sample_rate,
            "channels": info.channels}, None, None


def scan_corpus(corpus: str, root: str | os.PathLike, *, workers: int = 8, progress: bool = True,
                min_seconds: float = MIN_SECONDS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Parse and check every file of one corpus.

    Args:
        corpus: a name in :data:`pipeline.corpora.CORPORA`.
        root: the corpus folder (any layout below it).
        workers: threads reading headers (libsndfile releases the GIL).
        progress: show a progress bar.
        min_seconds: shortest usable clip; shorter ones are rejected as ``too_short``.

    Returns:
        ``(manifest, rejects)`` frames with :data:`COLUMNS` (+ ``text``, ``intensity``) and
        :data:`REJECT_COLUMNS`; ``path`` is relative to ``root`` (``/``-separated), so the manifest is the same
        wherever the corpus lies (``pipeline.roots.write_manifest`` records the root, ``read_manifest`` resolves).

    Raises:
        ValueError: unknown corpus, missing root, or no usable utterance.
    """
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; expected one of {sorted(CORPORA)}.")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"corpus folder {root} does not exist; expected the {corpus} files below it. "
                         "Run `python -m pipeline.pull` or point --root at a local copy.")
    if shown(root) != str(root):
        raise ValueError(f"corpus folder {shown(root)}: its path is not valid UTF-8 (undecodable bytes shown as "
                         "\\x..), and the audio library cannot open files there; expected a UTF-8 path. Rename it "
                         "or point --root at a link with a UTF-8 name.")
    parse = CORPORA[corpus].parser(root)
    rows, rejects, candidates = [], [], []
    files, problems = walk_files(root)
    top = shown(os.path.abspath(root)) + os.sep  # walk rows name absolute paths; the table names them as the rest
    rejects += [{**p, "path": p["path"].removeprefix(top).replace(os.sep, "/"), "corpus": corpus,
                 "detail": _relative_text(p["detail"], root)} for p in problems]
    for path in files:
        try:
            candidates.append((path, parse(path.relative_to(root))))
        except NameRejected as err:
            rejects.append({"path": _relative(path, root), "corpus": corpus, "reason": err.reason,
                            "detail": str(err)})
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(functools.partial(_inspect, min_seconds=min_seconds), [path for path, _ in candidates])
        bar = tqdm(results, total=len(candidates), desc=f"manifest {corpus}", unit="file", disable=not progress)
        for (path, parsed), (audio, reason, detail) in zip(candidates, bar, strict=True):
            if reason:
                rejects.append({"path": _relative(path, root), "corpus": corpus, "reason": reason,
                                "detail": _relative_text(detail, root)})
                continue
            rel = path.relative_to(root).with_suffix("").as_posix()
            rows.append({"id": f"{corpus}/{rel}", "path": _relative(path, root), "corpus": corpus,
                         "speaker": parsed.speaker, "gender": parsed.gender, "emotion": parsed.emotion,
                         **audio, **parsed.extra, "_key": parsed.key, "_file": os.path.realpath(path),
                         "_rank": (path.is_symlink(), _PREFERRED.get(path.suffix.lower(), 1), len(rel), rel)})
    manifest = pd.DataFrame(rows, columns=[*COLUMNS, "text", "intensity", "_key", "_file", "_rank"])
    manifest = manifest.sort_values("_rank", kind="stable")
    # one utterance named twice (two formats, a nested copy), or one file reached under two names (a link, which
    # could carry another label): the first by rank is kept, the others are counted
    for column, what in (("_key", "same utterance as"), ("_file", "the same file (a link) as")):
        duplicate = manifest.duplicated(column, keep="first")
        first = manifest.drop_duplicates(column).set_index(column)["path"]
        for _, row in manifest[duplicate].iterrows():
            rejects.append({"path": row["path"], "corpus": corpus, "reason": "duplicate",
                            "detail": f"{what} {first[row[column]]}"})
        manifest = manifest[~duplicate]
    manifest = manifest.drop(columns=["_key", "_file", "_rank"]).sort_values("id").reset_index(drop=True)
    rejects = pd.DataFrame(rejects, columns=REJECT_COLUMNS).sort_values("path").reset_index(drop=True)
    if manifest.empty:
        reasons = rejects["reason"].value_counts().to_dict()
        raise ValueError(f"no usable {corpus} utterance under {root}: {len(rejects)} files rejected {reasons}. "
                         f"Expected {CORPORA[corpus].FILES} files named by the corpus's convention; check the folder.")
    return manifest.dropna(axis=1, how="all"), rejects


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _relative_text(text: str | None, root: Path) -> str | None:
    """A reject's detail without the corpus's absolute location (it names the file relative to the root)."""
    return text.replace(f"{root}{os.sep}", "") if text else text


def build_manifest(sources: dict[str, str], **kw) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scan several corpora (``{corpus: root}``) into one manifest and one rejects table."""
    scanned = [scan_corpus(corpus, root, **kw) for corpus, root in sources.items()]
    manifest = pd.concat([m for m, _ in scanned], ignore_index=True)
    if manifest["id"].duplicated().any():
        raise ValueError("two corpora produced the same utterance id; give each corpus once.")
    documented = [*COLUMNS, "text", "intensity"]  # every documented column, empty where no corpus has it
    manifest = manifest.reindex(columns=[*documented, *(c for c in manifest.columns if c not in documented)])
    return manifest, pd.concat([r for _, r in scanned], ignore_index=True)


def summary(manifest: pd.DataFrame, rejects: pd.DataFrame) -> str:
    """A short human-readable account of what was kept and rejected."""
    lines = []
    for corpus, group in manifest.groupby("corpus"):
        genders = group.drop_duplicates("speaker")["gender"].value_counts().to_dict()
        lines.append(f"{corpus}: {len(group)} utterances, {group['speaker'].nunique()} speakers {genders}, "
                     f"{group['duration_s'].sum() / 3600:.2f} h; emotions {group['emotion'].value_counts().to_dict()}")
    reasons = rejects["reason"].value_counts().to_dict() if len(rejects) else {}
    lines.append(f"rejected {len(rejects)} files {reasons}")
    return "\n".join(lines)


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.manifest", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", action="append", default=[], help="corpus name (repeat with --root)")
    parser.add_argument("--root", action="append", default=[], help="corpus folder, one per --corpus")
    parser.add_argument("--sources", type=existing_file, help="JSON written by pipeline.pull: {corpus: {root: ...}}")
    parser.add_argument("--out", required=True, type=output_file, help="manifest CSV to write")
    parser.add_argument("--rejects", type=output_file, help="rejects CSV (default: beside --out as <name>_rejects.csv)")
    parser.add_argument("--workers", type=positive_int, default=8)
    parser.add_argument("--min-seconds", type=non_negative_float, default=MIN_SECONDS,
                        help=f"shortest clip kept (default {MIN_SECONDS}); shorter ones are rejected as too_short")
    args = parser.parse_args(argv)
    if len(args.corpus) != len(args.root):
        parser.error("give one --root per --corpus")
    named = list(args.corpus)
    if args.sources:
        try:
            pulled = {name: entry["root"] for name, entry in json.loads(Path(args.sources).read_text()).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            parser.error(f"--sources {args.sources}: expected the JSON pipeline.pull writes ({{corpus: {{\"root\": "
                         f"DIR, ...}}}}), found what cannot be read as one ({type(err).__name__}: {err}).")
        named += list(pulled)
    twice = sorted({name for name in named if named.count(name) > 1})
    if twice:
        parser.error(f"corpus {twice} named more than once (by --corpus or --sources); expected each corpus once, "
                     "with one --root. Merge the folders or drop the repeat.")
    sources = dict(zip(args.corpus, args.root, strict=True))
    if args.sources:
        sources.update(pulled)
    if not sources:
        parser.error("name a corpus (--corpus NAME --root DIR) or --sources FILE")
    try:
        manifest, rejects = build_manifest(sources, workers=args.workers, progress=sys.stderr.isatty(),
                                           min_seconds=args.min_seconds)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    rejects_path = Path(args.rejects) if args.rejects else out.with_name(f"{out.stem}_rejects.csv")
    write_files({rejects_path: rejects.to_csv(index=False)})  # each written whole (a kill keeps the earlier one)
    write_manifest(manifest, out, sources)
    print(summary(manifest, rejects), file=sys.stderr)
    print(f"wrote {out} ({len(manifest)} rows) and {rejects_path} ({len(rejects)} rows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
