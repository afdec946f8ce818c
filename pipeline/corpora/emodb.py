"""Berlin EmoDB: ``03a01Fa.wav`` (speaker, text code, emotion letter, version); ten speakers, 535 files.

Emotion letters (German): W anger, L boredom, E disgust, A fear, F happiness, T sadness, N neutral.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.corpora.base import NameRejected, Parsed

NAME = "emodb"
SPEAKERS = 10
FILES = 535
EMOTIONS = {"W": "angry", "L": "boredom", "E": "disgust", "A": "fearful", "F": "happy", "T": "sad", "N": "neutral"}
GENDERS = {"03": "male", "08": "female", "09": "female", "10": "male", "11": "male", "12": "male",
           "13": "female", "14": "female", "15": "male", "16": "female"}
#: The ten sentences EmoDB's speakers read.
TEXTS = {"a01", "a02", "a04", "a05", "a07", "b01", "b02", "b03", "b09", "b10"}
_PATTERN = re.compile(r"^(\d{2})([ab]\d{2})([WLEAFTN])([a-z])$", re.IGNORECASE | re.ASCII)


def parser(root: Path | None):
    """Return the file-name parser (speaker genders are documented with the corpus)."""
    return parse


def parse(path: Path) -> Parsed:
    match = _PATTERN.fullmatch(path.stem)
    if not match:
        raise NameRejected("bad_name", f"{path.name}: expected EmoDB's naming like 03a01Fa (speaker, text, "
                                       "emotion letter, version)")
    speaker, text, emotion, version = match.groups()
    if speaker not in GENDERS:
        raise NameRejected("bad_name", f"{path.name}: speaker {speaker} is not one of EmoDB's {sorted(GENDERS)}")
    if text.lower() not in TEXTS:
        raise NameRejected("bad_name", f"{path.name}: text {text} is not one of EmoDB's {sorted(TEXTS)}")
    return Parsed(key=f"{speaker}{text.lower()}{emotion.upper()}{version.lower()}", speaker=f"emodb_{speaker}",
                  gender=GENDERS[speaker], emotion=EMOTIONS[emotion.upper()], extra={"text": text.lower()})
