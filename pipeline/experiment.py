"""What every trainer reads first: manifests, split and label set, checked and cut into folds.

Used by both ``heads.train`` and ``baselines.train`` so that they refuse the same inputs with the same
messages: an unknown label set, a split with a leaked speaker (unless its scheme is ``random``, which is
speaker-dependent and labelled so), ids of the split missing from the manifest or from the features.

Example:
    >>> exp = load_experiment(["data/manifest.csv"], "data/splits.csv", "ravdess8")   # doctest: +SKIP
    >>> exp.require_ids(store.ids(), "data/features/egemaps.h5")                       # doctest: +SKIP
    >>> [len(f.train) for f in exp.folds]                                              # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.labels import select_labels
from pipeline.roots import read_manifests
from pipeline.split import PARTITIONS, SplitScheme, check_speaker_independent, read_split

#: Manifest columns every trainer reads.
MANIFEST_COLUMNS = ("id", "path", "corpus", "speaker", "emotion")


@dataclass(frozen=True)
class Fold:
    """The ids of one fold, each list sorted."""

    index: int
    train: list[str]
    val: list[str]
    test: list[str]


@dataclass
class Experiment:
    """A checked experiment.

    Attributes:
        labels: class names; a class id is an index into this list.
        frame: manifest rows kept by the label set, indexed by ``id``, with a ``label`` column (class id).
        folds: one :class:`Fold` per fold of the split, restricted to ``frame``'s ids.
        split_meta: the split's ``splits.json``, with ``speaker_independent`` true once the split passed the check
            that no speaker is on two sides (every scheme but ``random``).
        label_set, merge_calm: as selected.
        excluded: emotions left out by the label set, ``{emotion: n}``.
        augmentation: whether augmented copies were placed into training partitions.
    """

    labels: list[str]
    frame: pd.DataFrame
    folds: list[Fold]
    split_meta: dict
    label_set: str
    merge_calm: bool
    excluded: dict[str, int] = field(default_factory=dict)
    augmentation: bool = False

    def y(self, ids: Sequence[str]) -> np.ndarray:
        """Class ids of ``ids``, ``int64 [N]``."""
        return self.frame.loc[list(ids), "label"].to_numpy(np.int64)

    def speakers(self, ids: Sequence[str]) -> np.ndarray:
        """Speakers of ``ids``."""
        return self.frame.loc[list(ids), "speaker"].to_numpy()

    def needed_ids(self) -> list[str]:
        """Every id used by some fold, sorted."""
        return sorted({i for f in self.folds for part in (f.train, f.val, f.test) for i in part})

    def require_ids(self, available: Iterable[str], source: str) -> None:
        """Refuse features that lack utterances of the split.

        Raises:
            ValueError: naming how many ids are missing and a few of them.
        """
        have = set(available)
        missing = [i for i in self.needed_ids() if i not in have]
        if missing:
            raise ValueError(f"{source} lacks {len(missing)} of the {len(self.needed_ids())} utterances this "
                             f"split uses, e.g. {missing[:5]}; expected features for every id. Re-extract "
                             "the features from the same manifest, or re-split.")

    def missing_classes(self, partitions: Sequence[str] = ("train",)) -> dict[int, list[str]]:
        """Per fold, the labels with no utterance in ``partitions`` (a model cannot learn those classes)."""
        missing = {}
        for fold in self.folds:
            ids = [i for part in partitions for i in getattr(fold, part)]
            absent = sorted(set(range(len(self.labels))) - set(self.y(ids).tolist()))
            if absent:
                missing[fold.index] = [self.labels[c] for c in absent]
        return missing

    def warn_missing_classes(self, partitions: Sequence[str] = ("train",)) -> dict[int, list[str]]:
        """Print one ``warning:`` line per fold whose ``partitions`` lack a class; return
        :meth:`missing_classes`."""
        missing = self.missing_classes(partitions)
        for fold, labels in missing.items():
            print(f"warning: fold {fold} has no {'+'.join(partitions)} utterance of {labels} (label set "
                  f"{self.label_set!r}); its model never predicts them and their recall in this fold is 0. "
                  "Choose a split or label set where every fold trains every class.", file=sys.stderr)
        return missing

    def protocol(self) -> dict:
        """The split and label part of a run's ``protocol`` block."""
        return {
            "split_scheme": self.split_meta.get("scheme"),
            "speaker_independent": bool(self.split_meta.get("speaker_independent", False)),
            "n_folds": len(self.folds),
            "label_set": self.label_set,
            "merge_calm": self.merge_calm,
            "augmentation": self.augmentation,
            "corpora": sorted(self.frame["corpus"].unique().tolist()),
            "train_corpora": {str(f.index): sorted(self.frame.loc[f.train, "corpus"].unique().tolist())
                              for f in self.folds},
        }


def place_augmented(splits: pd.DataFrame, augmented: pd.DataFrame) -> pd.DataFrame:
    """Add each copy to the training side of every fold where its source is in training.

    Args:
        splits: long-format split ``fold, id, partition`` (may already hold placed copies).
        augmented: the augmented manifest (``id``, ``source_id``).

    Returns:
        ``splits`` plus rows ``(fold, copy id, "train")``, without duplicates.

    Raises:
        ValueError: a copy sits in a validation or test partition, or in a fold where its source is not in
            training; the message names the offending ids.
    """
    copies = augmented[["id", "source_id"]]
    orphans = copies[~copies["source_id"].isin(splits["id"])]
    if not orphans.empty:
        raise ValueError(f"{len(orphans)} augmented copies have sources absent from the split, e.g. "
                         f"{orphans['source_id'].head(3).tolist()}; expected copies made from this split. "
                         "Re-run the augment stage after the split stage.")
    placed = splits.merge(copies, on="id")
    in_heldout = placed[placed["partition"] != "train"]
    source_part = splits.rename(columns={"id": "source_id", "partition": "source_partition"})
    placed = placed.merge(source_part, on=["fold", "source_id"], how="left")
    leaked = placed[placed["source_partition"] != "train"]
    for bad, what in ((in_heldout, "placed in a validation or test partition"),
                      (leaked, "placed in a fold where its source is not in training")):
        if not bad.empty:
            raise ValueError(f"{len(bad)} augmented copies are {what}, e.g. {bad['id'].head(5).tolist()} "
                             f"(folds {sorted(bad['fold'].unique())[:5]}); expected copies only in training "
                             "beside their sources. Place copies with place_augmented, not by hand.")
    added = source_part[source_part["source_partition"] == "train"].merge(copies, on="source_id")
    added = added[["fold", "id"]].assign(partition="train")
    return pd.concat([splits, added], ignore_index=True).drop_duplicates(["fold", "id"], ignore_index=True)


def _place_copies(splits: pd.DataFrame, manifest: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    if "source_id" not in manifest or not manifest["source_id"].notna().any():
        return splits, False
    placed = place_augmented(splits, manifest[manifest["source_id"].notna()])
    return placed, len(placed) > len(splits)


def load_experiment(manifests: Sequence[str | os.PathLike], split: str | os.PathLike, label_set: str, *,
                    merge_calm: bool = False, augmentation: bool = True) -> Experiment:
    """Read and check the manifests and the split, select the labels and cut the folds.

    Args:
        manifests: manifest CSVs; rows with a ``source_id`` are augmented copies, placed into the training
            partition of the folds where their source trains (:func:`place_augmented`).
        split: ``splits.csv`` (its ``splits.json`` beside it).
        label_set: a name from ``pipeline.labels.label_set_names()``.
        merge_calm: map calm onto neutral.
        augmentation: use the augmented copies found in ``manifests`` (``False`` drops them).

    Raises:
        ValueError: unknown label set; split ids absent from the manifests; a speaker in two partitions of a
            fold of a split that claims speaker independence (or whose scheme is not ``random``).
    """
    manifest = read_manifests(manifests, required=MANIFEST_COLUMNS)
    if not augmentation and "source_id" in manifest:
        manifest = manifest[manifest["source_id"].isna()].reset_index(drop=True)
    selection = select_labels(manifest, label_set, merge_calm=merge_calm)  # refuses unknown label sets
    splits, meta = read_split(split)
    unknown = sorted(set(splits["id"]) - set(manifest["id"]))
    if unknown:
        raise ValueError(f"{split}: {len(unknown)} ids are in no manifest, e.g. {unknown[:5]}; expected the "
                         "split to be made from these manifests. Pass the manifest the split was made from.")
    splits, augmentation = _place_copies(splits, manifest)
    if meta.get("scheme") != SplitScheme.RANDOM or meta.get("speaker_independent"):
        check_speaker_independent(splits, manifest)  # raises on a leak: what passes is speaker-independent,
        meta = {**meta, "speaker_independent": True}  # a split without its splits.json sidecar included
    frame = selection.frame.set_index("id", drop=False)
    frame["label"] = frame["emotion"].map({name: i for i, name in enumerate(selection.labels)})
    kept = splits[splits["id"].isin(frame.index)]
    if selection.excluded:  # counted, never dropped silently
        print(f"label set {label_set!r} leaves out {sum(selection.excluded.values())} utterances "
              f"{selection.excluded}", file=sys.stderr)
    unsplit = frame.index.difference(kept["id"])
    if len(unsplit):
        print(f"warning: {len(unsplit)} utterances of label set {label_set!r} are in no fold of {split} "
              f"(e.g. {list(unsplit[:3])}) and are not used; expected a split made from these manifests. "
              "Re-run the split stage to use them.", file=sys.stderr)
    folds = []
    for index, group in kept.groupby("fold", sort=True):
        parts = {p: sorted(group.loc[group["partition"] == p, "id"]) for p in PARTITIONS}
        empty = [p for p in ("train", "test") if not parts[p]]
        if empty:
            raise ValueError(f"fold {index} of {split} has no {' and no '.join(empty)} utterances of label set "
                             f"{label_set!r}; expected both partitions non-empty. Check the split and label set.")
        folds.append(Fold(int(index), parts["train"], parts["val"], parts["test"]))
    return Experiment(selection.labels, frame, folds, meta, label_set, selection.merge_calm,
                      selection.excluded, augmentation)
