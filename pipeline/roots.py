"""Where a manifest's audio lies: paths relative to a corpus root recorded once, resolved in one place.

``pipeline.manifest`` writes ``path`` relative to each corpus's root and records the roots beside the manifest
(``manifest.csv`` -> ``manifest.roots.json``); ``pipeline.augment`` writes its copies' paths relative to its own
folder. The manifests then hold no location, so two clones of the project at different paths over the same
corpora write byte-identical manifests and identical ``dvc.lock`` hashes downstream. Every reader of a
manifest's ``path`` goes through :func:`read_manifest` (or :func:`resolve_paths`).

Example:
    >>> rows = read_manifest("data/manifest.csv")     # doctest: +SKIP
    >>> rows["path"].iloc[0]                           # doctest: +SKIP
    '/corpora/ravdess/Actor_01/03-01-01-01-01-01-01.wav'
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.outputs import write_files
from pipeline.tables import read_table


def roots_path(manifest: str | os.PathLike) -> Path:
    """The sidecar beside a manifest that records each corpus's root: ``manifest.csv`` -> ``manifest.roots.json``."""
    manifest = Path(manifest)
    return manifest.with_name(f"{manifest.stem}.roots.json")


def write_manifest(frame: pd.DataFrame, out: str | os.PathLike, roots: dict[str, str | os.PathLike]) -> Path:
    """Write a manifest whose ``path`` column is relative to its corpus's root, and the roots beside it.

    A root inside the manifest's folder is recorded relative to that folder (e.g. ``raw/ravdess`` for
    ``data/raw/ravdess`` beside ``data/manifest.csv``), any other root as an absolute path. The manifest itself
    then holds no location: two clones of the project over the same corpora write byte-identical manifests (and
    identical ``dvc.lock`` hashes) wherever they lie.

    Args:
        frame: rows with ``corpus`` and a root-relative ``path``.
        out: the manifest CSV; the roots go to :func:`roots_path` of it.
        roots: ``{corpus: root folder}``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    here = out.parent.resolve()
    recorded = {}
    for corpus, root in sorted(roots.items()):
        root = Path(root).resolve()
        recorded[corpus] = root.relative_to(here).as_posix() if root.is_relative_to(here) else str(root)
    write_files({out: frame.to_csv(index=False), roots_path(out): json.dumps(recorded, indent=2) + "\n"})
    return out


def resolve_paths(frame: pd.DataFrame, manifest: str | os.PathLike) -> pd.DataFrame:
    """The manifest's rows with ``path`` made absolute: the one place where a manifest's paths are resolved.

    A relative path is joined to its corpus's root recorded in :func:`roots_path` (a relative root is relative to
    the manifest's folder), or, for a corpus without a recorded root, to the manifest's folder itself; an
    absolute path is kept.

    Raises:
        ValueError: the manifest has no ``path`` or ``corpus`` column where a relative path needs a root.
    """
    if "path" not in frame:
        raise ValueError(f"{manifest}: expected a path column, found {list(frame.columns)}; pass a manifest "
                         "written by pipeline.manifest or pipeline.augment.")
    if frame.empty:
        return frame
    here = Path(manifest).resolve().parent
    sidecar = roots_path(manifest)
    roots = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    corpora = frame["corpus"] if "corpus" in frame else pd.Series("", index=frame.index)
    paths = []
    for path, corpus in zip(frame["path"].astype(str), corpora.astype(str), strict=True):
        if os.path.isabs(path):
            paths.append(path)
        else:
            paths.append(str(here / roots.get(corpus, ".") / path))
    return frame.assign(path=paths)


def read_manifest(path: str | os.PathLike, **read_csv) -> pd.DataFrame:
    """Read a manifest CSV (``id``, ``speaker`` and ``path`` as text) with its paths resolved
    (:func:`resolve_paths`)."""
    dtype = {"id": str, "speaker": str, "path": str, **read_csv.pop("dtype", {})}
    return resolve_paths(pd.read_csv(path, dtype=dtype, **read_csv), path)


def read_manifests(paths: Sequence[str | os.PathLike], *, required: Sequence[str] = ("id", "path"),
                   keep_default_na: bool = True) -> pd.DataFrame:
    """Concatenate manifests (the original, then augmented copies with ``source_id``), paths resolved.

    Args:
        paths: manifest CSVs; none gives an empty frame with the ``required`` columns.
        required: columns every manifest must have (trainers need ``corpus``, ``speaker``, ``emotion`` too).
        keep_default_na: as :func:`pipeline.tables.read_table`.

    Raises:
        FileNotFoundError: a manifest is missing.
        ValueError: a manifest that is not a CSV or lacks a required column, or an id in two rows.
    """
    frames = [resolve_paths(read_table(p, required=required, what="manifest", keep_default_na=keep_default_na,
                                       dtype={"id": str, "speaker": str, "path": str}), p) for p in paths]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(required))
    dup = rows["id"][rows["id"].duplicated()]
    if len(dup):
        raise ValueError(f"expected unique ids across the manifests, found {len(dup)} repeated (e.g. "
                         f"{dup.head(3).tolist()}). Pass each manifest only once; an augmented manifest gives its "
                         "copies ids of their own.")
    return rows

