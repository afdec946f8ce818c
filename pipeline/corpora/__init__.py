"""One module per corpus; each turns a file name into labels, following the corpus's own convention.

Every corpus module exposes ``NAME``, ``SPEAKERS`` (the documented number), ``FILES`` (the documented
number of speech utterances) and ``parser(root) -> parse``, where ``parse(path)`` returns a
:class:`Parsed` or raises :class:`NameRejected`. Labels come from file names, never folder names (SAVEE's
``DC/a01.wav`` layout is the one exception the corpus itself defines), and any letter case is accepted.

Example:
    >>> from pathlib import Path
    >>> from pipeline.corpora import CORPORA
    >>> parse = CORPORA["emodb"].parser(None)
    >>> parse(Path("wav/03a01Fa.wav")).emotion
    'happy'
"""

from __future__ import annotations

from types import ModuleType

from pipeline.corpora import cremad, emodb, ravdess, savee, tess
from pipeline.corpora.base import NameRejected, Parsed

__all__ = ["CORPORA", "NameRejected", "Parsed"]

#: Registry ``{name: module}`` of the supported corpora.
CORPORA: dict[str, ModuleType] = {m.NAME: m for m in (ravdess, cremad, tess, savee, emodb)}
