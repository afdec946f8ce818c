"""The canonical emotion vocabulary and the named label sets that choose an experiment's classes.

Every corpus parser maps its own codes onto :data:`EMOTIONS`. An experiment then picks its classes with
a named label set (:data:`LABEL_SETS`), optionally merging ``calm`` into ``neutral``.

Example:
    >>> import pandas as pd
    >>> df = pd.DataFrame({"corpus": ["ravdess"] * 3, "emotion": ["calm", "happy", "neutral"]})
    >>> sel = select_labels(df, "six", merge_calm=True)
    >>> sel.labels[:3], list(sel.frame.emotion)
    (['neutral', 'happy', 'sad'], ['neutral', 'happy', 'neutral'])
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

#: Canonical emotions, in the order used for every label set.
EMOTIONS: tuple[str, ...] = (
    "neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised", "boredom",
)

#: Fixed label sets. ``common`` is not listed: it is computed from the corpora of the experiment.
LABEL_SETS: dict[str, tuple[str, ...]] = {
    "ravdess8": ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"),
    "ravdess7": ("neutral", "happy", "sad", "angry", "fearful", "disgust", "surprised"),  # calm -> neutral
    "six": ("neutral", "happy", "sad", "angry", "fearful", "disgust"),
    "four": ("neutral", "happy", "sad", "angry"),
}
COMMON = "common"
#: Label sets that only make sense with calm merged into neutral.
_MERGES_CALM = {"ravdess7"}


def label_set_names() -> list[str]:
    """Every name :func:`select_labels` accepts."""
    return [*LABEL_SETS, COMMON]


@dataclass(frozen=True)
class LabelSelection:
    """Result of :func:`select_labels`.

    Attributes:
        name: the label set's name.
        labels: class names in canonical order (index = class id).
        merge_calm: whether ``calm`` was mapped to ``neutral``.
        frame: the rows kept, ``emotion`` already mapped.
        excluded: counts of the emotions left out, ``{emotion: n}`` (reported, never silent).
    """

    name: str
    labels: list[str]
    merge_calm: bool
    frame: pd.DataFrame
    excluded: dict[str, int]


def select_labels(manifest: pd.DataFrame, label_set: str, *, merge_calm: bool = False) -> LabelSelection:
    """Keep the manifest rows whose emotion belongs to ``label_set``.

    Args:
        manifest: a frame with ``emotion`` (and ``corpus`` for ``common``) columns.
        label_set: a name from :func:`label_set_names`.
        merge_calm: map ``calm`` to ``neutral`` first (always done for ``ravdess7``).

    Raises:
        ValueError: unknown label set, an emotion that is missing or not a harmonised label, or no row left.
    """
    if label_set not in label_set_names():
        raise ValueError(f"unknown label set {label_set!r}; expected one of {label_set_names()}.")
    merge_calm = merge_calm or label_set in _MERGES_CALM
    unknown = manifest["emotion"].isna() | ~manifest["emotion"].isin(EMOTIONS)
    if unknown.any():  # left out silently, they would shrink every label set without a word
        found = sorted(set(manifest.loc[unknown, "emotion"].astype(object).where(manifest["emotion"].notna(),
                                                                                 "(missing)").astype(str)))
        where = f" (e.g. id {manifest.loc[unknown, 'id'].iloc[0]!r})" if "id" in manifest else ""
        raise ValueError(f"expected every emotion to be a harmonised label {list(EMOTIONS)}, found "
                         f"{int(unknown.sum())} rows with {found[:5]}{where}. Rebuild the manifest with python -m "
                         "pipeline.manifest, which harmonises each corpus's codes.")
    frame = manifest.copy()
    if merge_calm:
        frame["emotion"] = frame["emotion"].replace({"calm": "neutral"})
    if label_set == COMMON:
        per_corpus = [set(g["emotion"]) for _, g in frame.groupby("corpus")]
        shared = set.intersection(*per_corpus) if per_corpus else set()
        labels = [e for e in EMOTIONS if e in shared]
    else:
        labels = [e for e in LABEL_SETS[label_set] if not (merge_calm and e == "calm")]
    keep = frame["emotion"].isin(labels)
    excluded = frame.loc[~keep, "emotion"].value_counts().to_dict()
    frame = frame.loc[keep].reset_index(drop=True)
    if frame.empty:
        raise ValueError(f"label set {label_set!r} ({labels}) keeps no utterance of this manifest, whose "
                         f"emotions are {sorted(manifest['emotion'].unique())}; choose another label set.")
    return LabelSelection(label_set, labels, merge_calm, frame, {str(k): int(v) for k, v in excluded.items()})
