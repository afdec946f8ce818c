"""Reading the CSV artefacts every stage passes on (manifests, splits), with errors that name the file.

A damaged or foreign CSV otherwise ends in pandas' own message (``'utf-8' codec can't decode ...``) or a
``KeyError`` traceback far from the cause; :func:`read_table` says which file, what was expected and what to do.

Example:
    >>> frame = read_table("data/manifest.csv", required=["id", "speaker"], what="manifest")   # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import pandas as pd


def read_table(path: str | os.PathLike, *, required: Sequence[str], what: str,
               dtype: Mapping[str, type] | None = None, keep_default_na: bool = True) -> pd.DataFrame:
    """Read a CSV and check that it has the ``required`` columns.

    Args:
        path: the CSV.
        required: columns it must have.
        what: what the file is (``manifest``, ``split``), for the messages.
        dtype: pandas dtypes of some columns.
        keep_default_na: read empty cells and ``NA``-like text as missing (``False``: as text).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a readable CSV, or columns missing.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such {what} file; expected the CSV written by the {what} stage. "
                                "Check the path, or run that stage first.")
    try:
        frame = pd.read_csv(path, dtype=dict(dtype or {}), keep_default_na=keep_default_na)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{path}: cannot be read as a {what} CSV ({err}); expected the file the {what} stage "
                         "writes. It is damaged or another file: write it again.") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: the {what} lacks columns {missing} (found {list(frame.columns)}); expected "
                         f"at least {list(required)}. Pass the file the {what} stage writes.")
    return frame
