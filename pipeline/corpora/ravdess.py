"""RAVDESS speech: ``03-01-EE-II-SS-RR-AA`` (modality, vocal channel, emotion, intensity, statement,
repetition, actor). 24 actors, odd ids male, even ids female; 1440 speech utterances.

Only audio-only (modality 03) speech (vocal channel 01) files are speech utterances; song and video
files are rejected as ``not_speech``.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.corpora.base import NameRejected, Parsed

NAME = "ravdess"
SPEAKERS = 24
FILES = 1440
EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
            "07": "disgust", "08": "surprised"}
STATEMENTS = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}
_PATTERN = re.compile(r"(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})", re.ASCII)


def parser(root: Path | None):
    """Return the file-name parser (RAVDESS needs no metadata file)."""
    return parse


def parse(path: Path) -> Parsed:
    match = _PATTERN.fullmatch(path.stem)
    if not match:
        raise NameRejected("bad_name", f"{path.name}: expected RAVDESS's 03-01-EE-II-SS-RR-AA naming")
    modality, channel, emotion, intensity, statement, repetition, actor = match.groups()
    if modality not in {"01", "02", "03"} or channel not in {"01", "02"}:
        raise NameRejected("bad_name", f"{path.name}: modality {modality} or vocal channel {channel} is outside "
                                       "RAVDESS's codes (modality 01-03, vocal channel 01-02)")
    if modality != "03" or channel != "01":
        kind = {"01": "audio-video", "02": "video-only"}.get(modality, "audio-only")
        what = "song" if channel == "02" else f"modality {modality}"
        raise NameRejected("not_speech", f"{path.name}: {kind} {what} file; only 03-01 (audio-only speech) is used")
    if (emotion not in EMOTIONS or intensity not in {"01", "02"} or statement not in STATEMENTS
            or repetition not in {"01", "02"} or not 1 <= int(actor) <= SPEAKERS):
        raise NameRejected("bad_name", f"{path.name}: a field is outside RAVDESS's codes "
                                       "(emotion 01-08, intensity 01-02, statement 01-02, repetition 01-02, actor 01-24)")
    if emotion == "01" and intensity == "02":
        raise NameRejected("bad_name", f"{path.name}: neutral at strong intensity (02); RAVDESS recorded neutral at "
                                       "normal intensity (01) only")
    return Parsed(
        key=path.stem, speaker=f"ravdess_{actor}", gender="male" if int(actor) % 2 else "female",
        emotion=EMOTIONS[emotion],
        extra={"text": STATEMENTS[statement], "intensity": "strong" if intensity == "02" else "normal"},
    )
