"""TESS: ``OAF_word_emotion`` / ``YAF_word_emotion``; two female speakers, 200 words x 7 emotions each
(2800 files). ``ps`` is pleasant surprise.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.corpora.base import NameRejected, Parsed

NAME = "tess"
SPEAKERS = 2
FILES = 2800
EMOTIONS = {"angry": "angry", "disgust": "disgust", "fear": "fearful", "happy": "happy", "neutral": "neutral",
            "ps": "surprised", "sad": "sad",
            # spellings seen in redistributed copies
            "anger": "angry", "disgusted": "disgust", "fearful": "fearful", "happiness": "happy", "sadness": "sad",
            "pleasant_surprise": "surprised", "pleasant_surprised": "surprised", "pleasant-surprise": "surprised",
            "surprise": "surprised", "surprised": "surprised"}
_PATTERN = re.compile(r"^(OAF|YAF)_(.+?)_(" + "|".join(re.escape(e) for e in sorted(EMOTIONS, key=len, reverse=True)) + r")$",
                      re.IGNORECASE | re.ASCII)


def parser(root: Path | None):
    """Return the file-name parser (TESS needs no metadata file)."""
    return parse


def parse(path: Path) -> Parsed:
    match = _PATTERN.fullmatch(path.stem.strip())
    if not match:
        raise NameRejected("bad_name", f"{path.name}: expected TESS's OAF_word_emotion or YAF_word_emotion naming "
                                       f"(emotion one of {sorted(EMOTIONS)})")
    speaker, word, emotion = match.group(1).upper(), match.group(2).lower(), EMOTIONS[match.group(3).lower()]
    return Parsed(key=f"{speaker}_{word}_{emotion}", speaker=f"tess_{speaker}", gender="female",
                  emotion=emotion, extra={"text": word})
