"""SAVEE: speakers DC, JE, JK, KL (all male); emotion prefix a, d, f, h, n, sa, su and a number,
named ``DC_a01.wav`` (flat) or ``DC/a01.wav`` (the official AudioData layout); 480 utterances.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.corpora.base import NameRejected, Parsed

NAME = "savee"
SPEAKERS = 4
FILES = 480
EMOTIONS = {"a": "angry", "d": "disgust", "f": "fearful", "h": "happy", "n": "neutral", "sa": "sad",
            "su": "surprised"}
_SPEAKERS = ("DC", "JE", "JK", "KL")
#: Sentences per emotion of each speaker: 15, and 30 for neutral.
SENTENCES = {code: 30 if code == "n" else 15 for code in EMOTIONS}
_FLAT = re.compile(r"^(DC|JE|JK|KL)_(sa|su|a|d|f|h|n)(\d{1,3})$", re.IGNORECASE | re.ASCII)
_NESTED = re.compile(r"^(sa|su|a|d|f|h|n)(\d{1,3})$", re.IGNORECASE | re.ASCII)


def parser(root: Path | None):
    """Return the file-name parser (SAVEE needs no metadata file)."""
    return parse


def parse(path: Path) -> Parsed:
    flat = _FLAT.fullmatch(path.stem)
    nested = _NESTED.fullmatch(path.stem)
    if flat:
        speaker, code, number = flat.groups()
    elif nested and path.parent.name.upper() in _SPEAKERS:
        speaker, (code, number) = path.parent.name, nested.groups()
    else:
        raise NameRejected("bad_name", f"{path}: expected SAVEE's DC_a01 naming, or a01 inside a DC/JE/JK/KL folder")
    speaker, code = speaker.upper(), code.lower()
    if not 1 <= int(number) <= SENTENCES[code]:
        raise NameRejected("bad_name", f"{path}: sentence {int(number)} is outside SAVEE's 1-{SENTENCES[code]} for "
                                       f"emotion {code}")
    return Parsed(key=f"{speaker}_{code}{int(number):02d}", speaker=f"savee_{speaker}", gender="male",
                  emotion=EMOTIONS[code], extra={"text": f"{code}{int(number):02d}"})
