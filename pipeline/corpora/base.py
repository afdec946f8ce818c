"""What every corpus module returns or raises: the labels of one file name, or its rejection."""

from __future__ import annotations

from dataclasses import dataclass, field


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
