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

from dataclasses import dataclass, field
from types import ModuleType


@dataclass(frozen=True)
class Parsed:
    """Labels read from one file name.

    Attributes:
        key: identifies the utterance within the corpus; two files with one key are duplicates.
        speaker: globally unique, corpus-prefixed speaker id.
        gender: ``male``, ``female`` or ``unknown``.
        emotion: a canonical emotion (``pipeline.labels.EMOTIONS``).
        extra: corpus-specific columns (``text``, ``intensity``).
    """

    key: str
    speaker: str
    gender: str
    emotion: str
    extra: dict = field(default_factory=dict)


class NameRejected(ValueError):
    """A file the corpus's convention does not admit; ``reason`` is ``bad_name`` or ``not_speech``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _load() -> dict[str, ModuleType]:
    from pipeline.corpora import cremad, emodb, ravdess, savee, tess

    return {m.NAME: m for m in (ravdess, cremad, tess, savee, emodb)}


#: Registry ``{name: module}`` of the supported corpora.
CORPORA: dict[str, ModuleType] = _load()
