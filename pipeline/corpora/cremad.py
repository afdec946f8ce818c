"""CREMA-D: ``AAAA_SSS_EMO_LVL`` (actor 1001-1091, sentence code, emotion, level LO/MD/HI/XX).

91 actors, 7442 clips. Gender comes from the corpus's ``VideoDemographics.csv`` (found anywhere under the
root, any case) when present, else ``unknown``.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

from pipeline.corpora.base import NameRejected, Parsed

NAME = "cremad"
SPEAKERS = 91
FILES = 7442
EMOTIONS = {"ANG": "angry", "DIS": "disgust", "FEA": "fearful", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
#: The 12 sentences CREMA-D's actors read.
SENTENCES = {"IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI"}
LEVELS = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified", "X": "unspecified"}
_PATTERN = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{1,2})$", re.IGNORECASE | re.ASCII)


def read_demographics(root: Path | None) -> dict[str, str]:
    """``{actor id: male|female}`` from ``VideoDemographics.csv``; empty when the file is absent."""
    if root is None:
        return {}
    found = sorted(p for p in Path(root).rglob("*") if p.name.lower() == "videodemographics.csv")
    if not found:
        print(f"warning: {root} holds no VideoDemographics.csv (CREMA-D's actor list); every actor's gender is "
              "'unknown', and folds are balanced by size alone. Put the file beside the audio (`python -m "
              "pipeline.pull` fetches it).", file=sys.stderr)
        return {}
    genders = {}
    with open(found[0], newline="", encoding="utf-8-sig") as handle:
        for row in csv.DictReader(handle):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            sex = row.get("sex", "").lower()
            if row.get("actorid") and sex in {"male", "female"}:
                genders[row["actorid"]] = sex
    return genders


def parser(root: Path | None):
    """Return a parser that knows each actor's gender from the demographics file."""
    genders = read_demographics(root)

    def parse(path: Path) -> Parsed:
        match = _PATTERN.fullmatch(path.stem)
        if not match:
            raise NameRejected("bad_name", f"{path.name}: expected CREMA-D's AAAA_SSS_EMO_LVL naming")
        actor, sentence, emotion, level = (g.upper() for g in match.groups())
        if (emotion not in EMOTIONS or level not in LEVELS or sentence not in SENTENCES
                or not 1001 <= int(actor) <= 1091):
            raise NameRejected("bad_name", f"{path.name}: emotion must be one of {sorted(EMOTIONS)}, level one "
                                           f"of {sorted(LEVELS)}, sentence one of {sorted(SENTENCES)}, actor "
                                           "1001-1091")
        # the corpus names one unspecified level X once: the same utterance as XX for the duplicate check
        key_level = "XX" if level == "X" else level
        return Parsed(key=f"{actor}_{sentence}_{emotion}_{key_level}", speaker=f"cremad_{actor}",
                      gender=genders.get(actor, "unknown"), emotion=EMOTIONS[emotion],
                      extra={"text": sentence, "intensity": LEVELS[level]})

    return parse
