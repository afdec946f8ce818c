"""Stage ``split``: speaker-independent train/val/test assignments, with a guard against speaker leakage.

Usage::

    python -m pipeline.split --manifest M --scheme actor_holdout|speaker_kfold|cross_corpus|random --out splits.csv

Writes long-format rows ``fold, id, partition`` (partition ``train``/``val``/``test``; ``fold`` 0 for single
splits) and a sidecar ``splits.json`` (scheme, speaker independence, folds, speakers per partition).

Schemes (each corpus of a multi-corpus manifest is split on its own, then the folds are joined):

- ``actor_holdout``: speakers sorted by id; the last 10 % (at least one) test, the 10 % before them
  validation, the rest training. For RAVDESS this is the seed protocol: actors 1-20 / 21-22 / 23-24.
- ``speaker_kfold``: folds of speaker groups. RAVDESS: 6 folds of 4 consecutive actors (two male, two
  female each; kept when some files were rejected); SAVEE, EmoDB: leave one speaker out; TESS: train on one speaker, test on the other;
  CREMA-D: 5 folds. Other corpora, or ``--folds K``: K groups balanced by utterance count and gender.
  Each fold validates on the next group (taken from its training speakers). TESS has only two speakers,
  so its folds have no validation speaker (a validation split of the training speaker would leak).
- ``cross_corpus``: one fold per corpus of a multi-corpus manifest: train on that corpus (its ``actor_holdout``
  validation and test speakers validate), test on every other corpus. Train with the ``common`` label set.
- ``random``: stratified (by emotion) random 80/10/10 split of utterances. Speaker-DEPENDENT: kept only
  to show how much leakage inflates scores; ``splits.json`` marks it so.
"""

from __future__ import annotations

import argparse
import json
import sys
from enum import StrEnum
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.cli import existing_file, non_negative_int, output_file, positive_int, run_main
from pipeline.outputs import write_files
from pipeline.tables import read_table


class SplitScheme(StrEnum):
    """How utterances are dealt into train, validation and test (the module docstring says how each works)."""

    ACTOR_HOLDOUT = "actor_holdout"
    SPEAKER_KFOLD = "speaker_kfold"
    CROSS_CORPUS = "cross_corpus"
    RANDOM = "random"  # speaker-dependent: only for the leakage audit


PARTITIONS = ("train", "val", "test")
#: Speaker-group folds of each corpus's usual protocol: ``None`` means leave one speaker out.
PROTOCOL_FOLDS = {"ravdess": 6, "cremad": 5, "tess": None, "savee": None, "emodb": None}
#: Corpora whose protocol folds are groups of consecutive speakers, whatever files are missing (RAVDESS: actors
#: 1-4, 5-8, ...: two male and two female each).
CONSECUTIVE_PROTOCOL = {"ravdess"}


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def holdout_groups(speakers: list[str]) -> dict[str, str]:
    """Fixed assignment ``{speaker: partition}`` of sorted speakers: ~80 / 10 / 10 %."""
    speakers = sorted(speakers)
    n = len(speakers)
    n_test = max(1, round(0.1 * n))
    n_val = max(1, round(0.1 * n)) if n >= 3 else 0
    if n < 2:
        raise ValueError(f"actor_holdout needs at least 2 speakers per corpus; found {n} ({speakers}).")
    return {s: "train" if i < n - n_test - n_val else "val" if i < n - n_test else "test"
            for i, s in enumerate(speakers)}


def speaker_groups(utterances: pd.DataFrame, n_folds: int | None, *, consecutive: bool = False) -> list[list[str]]:
    """Split a corpus's speakers into ``n_folds`` groups (``None``: one speaker per group).

    Groups are consecutive when the speakers divide evenly and either every speaker has as many utterances or
    ``consecutive`` asks for it (RAVDESS's protocol, actors 1-4, 5-8, ..., kept when a file or two were
    rejected); otherwise speakers are dealt, largest first, to the group with the fewest utterances,
    alternating gender.
    """
    counts = utterances.groupby("speaker").size()
    speakers = sorted(counts.index)
    if n_folds is None or n_folds >= len(speakers):
        return [[s] for s in speakers]
    if n_folds < 2:
        raise ValueError(f"speaker_kfold needs at least 2 folds; got {n_folds}.")
    if len(speakers) % n_folds == 0 and (consecutive or counts.nunique() == 1):
        size = len(speakers) // n_folds
        return [speakers[i:i + size] for i in range(0, len(speakers), size)]
    gender = utterances.drop_duplicates("speaker").set_index("speaker")["gender"] if "gender" in utterances \
        else pd.Series(dtype=object)  # unknown genders: groups balanced by size alone
    order = sorted(speakers, key=lambda s: (-counts[s], gender.get(s, ""), s))
    groups, load = [[] for _ in range(n_folds)], np.zeros(n_folds)
    for speaker in order:
        same = np.array([sum(gender.get(o) == gender.get(speaker) for o in g) for g in groups])
        target = int(np.lexsort((same, load))[0])
        groups[target].append(speaker)
        load[target] += counts[speaker]
    return [sorted(g) for g in groups]


def _kfold_rows(utterances: pd.DataFrame, n_folds: int | None, consecutive: bool = False) -> pd.DataFrame:
    groups = speaker_groups(utterances, n_folds, consecutive=consecutive)
    speaker_fold = {s: i for i, g in enumerate(groups) for s in g}
    rows = []
    for fold in range(len(groups)):
        val_group = (fold + 1) % len(groups) if len(groups) > 2 else None
        group = utterances["speaker"].map(speaker_fold)
        partition = np.where(group == fold, "test", np.where(group == val_group, "val", "train"))
        rows.append(pd.DataFrame({"fold": fold, "id": utterances["id"].values, "partition": partition}))
    return pd.concat(rows, ignore_index=True)


def _cross_corpus_rows(manifest: pd.DataFrame, corpora: list[str]) -> pd.DataFrame:
    if len(corpora) < 2:
        raise ValueError(f"cross_corpus needs a manifest of at least 2 corpora; found {corpora}. Enable more "
                         "corpora in params.yaml (corpora.enabled).")
    rows = []
    for fold, train_corpus in enumerate(corpora):
        own = manifest["corpus"] == train_corpus
        assign = holdout_groups(list(manifest.loc[own, "speaker"].unique()))
        partition = manifest["speaker"].map(assign).replace({"test": "val"}).where(own, "test")
        rows.append(pd.DataFrame({"fold": fold, "id": manifest["id"].values, "partition": partition.values}))
    return pd.concat(rows, ignore_index=True)


def _random_rows(utterances: pd.DataFrame, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    partition = pd.Series("train", index=utterances.index)
    for _, group in utterances.groupby("emotion"):
        order = rng.permutation(group.index.to_numpy())
        n_test = n_val = max(1, round(0.1 * len(order))) if len(order) >= 3 else 0
        partition[order[:n_test]] = "test"
        partition[order[n_test:n_test + n_val]] = "val"
    return pd.DataFrame({"fold": 0, "id": utterances["id"].values, "partition": partition.values})


def make_split(manifest: pd.DataFrame, *, scheme: str, seed: int = 0, n_folds: int | None = None) -> pd.DataFrame:
    """Assign every manifest utterance to a partition of each fold.

    Args:
        manifest: frame with ``id, corpus, speaker, gender, emotion``.
        scheme: a :class:`SplitScheme`.
        seed: seeds the ``random`` scheme (the others are fixed by speaker ids).
        n_folds: ``speaker_kfold`` only; overrides the corpora's protocol fold counts.

    Returns:
        Long-format frame ``fold, id, partition``.

    Raises:
        ValueError: unknown scheme, too few speakers, or a speaker on two sides of a fold.
    """
    if scheme not in list(SplitScheme):
        raise ValueError(f"unknown split scheme {scheme!r}; expected one of {[str(s) for s in SplitScheme]}.")
    scheme = SplitScheme(scheme)
    for column in ("corpus", "speaker"):
        empty = manifest[column].isna() | (manifest[column].astype(str).str.strip() == "")
        if empty.any():
            raise ValueError(f"expected a {column} on every manifest row, found {int(empty.sum())} without one (e.g. "
                             f"id {manifest.loc[empty, 'id'].iloc[0]!r}). Rebuild the manifest (python -m "
                             "pipeline.manifest).")
    corpora = sorted(manifest["corpus"].unique())
    if n_folds is not None and scheme != SplitScheme.SPEAKER_KFOLD:
        raise ValueError(f"--folds {n_folds}: only speaker_kfold has a fold count; found scheme {scheme}. Drop "
                         "--folds.")
    if scheme == SplitScheme.SPEAKER_KFOLD:
        speakers = manifest.groupby("corpus")["speaker"].nunique()
        few = speakers[speakers < 2]
        if len(few):
            raise ValueError(f"speaker_kfold: expected at least 2 speakers in every corpus, found {few.to_dict()}; "
                             "a fold would have nothing to train on. Leave such a corpus out, or use cross_corpus.")
        if n_folds is not None and n_folds > speakers.min():
            raise ValueError(f"--folds {n_folds}: expected at most {int(speakers.min())} (the fewest speakers of a "
                             f"corpus: {speakers.idxmin()}), found more. Pass a smaller --folds, or none for the "
                             "corpora's own protocols.")
    if scheme == SplitScheme.SPEAKER_KFOLD and n_folds is None and len(corpora) > 1:
        counts = [PROTOCOL_FOLDS.get(c) or manifest.loc[manifest.corpus == c, "speaker"].nunique() for c in corpora]
        n_folds = min(counts)  # every utterance is tested exactly once across the joined folds
    parts = [_cross_corpus_rows(manifest, corpora)] if scheme == SplitScheme.CROSS_CORPUS else []
    for corpus in corpora if scheme != SplitScheme.CROSS_CORPUS else []:
        utterances = manifest[manifest["corpus"] == corpus].reset_index(drop=True)
        if scheme == SplitScheme.RANDOM:
            parts.append(_random_rows(utterances, seed))
        elif scheme == SplitScheme.ACTOR_HOLDOUT:
            assign = holdout_groups(list(utterances["speaker"].unique()))
            parts.append(pd.DataFrame({"fold": 0, "id": utterances["id"], "partition": utterances["speaker"].map(assign)}))
        else:
            folds = n_folds if n_folds is not None else PROTOCOL_FOLDS.get(corpus, 5)
            protocol = corpus in CONSECUTIVE_PROTOCOL and folds == PROTOCOL_FOLDS[corpus]
            parts.append(_kfold_rows(utterances, folds, consecutive=protocol))
    splits = pd.concat(parts, ignore_index=True).sort_values(["fold", "id"], kind="stable").reset_index(drop=True)
    if scheme != SplitScheme.RANDOM:
        check_speaker_independent(splits, manifest)
    return splits


def speaker_overlaps(splits: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows ``fold, speaker, partitions`` for every speaker found in more than one partition of a fold."""
    speakers = manifest.set_index("id")["speaker"]
    missing = ~splits["id"].isin(speakers.index)
    if missing.any():
        raise ValueError(f"{missing.sum()} split ids are not in the manifest (e.g. {splits.loc[missing, 'id'].iloc[0]!r}); "
                         "expected a split made from this manifest. Re-run the split stage.")
    frame = splits.assign(speaker=splits["id"].map(speakers))
    unknown = frame["speaker"].isna() | (frame["speaker"].astype(str).str.strip() == "")
    if unknown.any():  # such rows would fall out of the check below
        raise ValueError(f"{int(unknown.sum())} split ids have no speaker in the manifest (e.g. "
                         f"{frame.loc[unknown, 'id'].iloc[0]!r}); expected a speaker for every utterance, or the "
                         "check for speakers on both sides cannot be made. Fill the manifest's speaker column.")
    # one person whatever the case or surrounding spaces of the id (manifests merged from several sources)
    frame["person"] = frame["speaker"].astype(str).str.strip().str.casefold()
    parts = frame.groupby(["fold", "person"]).agg(
        speaker=("speaker", lambda s: "/".join(sorted(set(map(str, s))))),
        partitions=("partition", lambda p: sorted(set(p))))
    leaked = parts[parts["partitions"].map(len) > 1]
    return leaked.reset_index()[["fold", "speaker", "partitions"]]


def check_speaker_independent(splits: pd.DataFrame, manifest: pd.DataFrame) -> None:
    """Refuse a split in which one speaker sits in two partitions of one fold.

    Raises:
        ValueError: naming the leaked speakers, folds and partitions.
    """
    leaked = speaker_overlaps(splits, manifest)
    if len(leaked):
        examples = "; ".join(f"fold {r.fold}: {r.speaker} in {'+'.join(r.partitions)}" for r in leaked.head(5).itertuples())
        raise ValueError(f"split is not speaker-independent: {len(leaked)} (fold, speaker) pairs span several "
                         f"partitions ({examples}). Expected each speaker in one partition per fold; use the "
                         "actor_holdout or speaker_kfold scheme, or label the run speaker-dependent (random).")


def describe(splits: pd.DataFrame, manifest: pd.DataFrame, *, scheme: str, seed: int) -> dict:
    """The sidecar's content: scheme, speaker independence and, per fold, speakers and sizes per partition."""
    speakers = manifest.set_index("id")["speaker"]
    frame = splits.assign(speaker=splits["id"].map(speakers))
    folds = []
    for fold, group in frame.groupby("fold"):
        entry = {"fold": int(fold)}
        for part in PARTITIONS:
            sel = group[group["partition"] == part]
            entry[part] = {"utterances": int(len(sel)), "speakers": sorted(sel["speaker"].unique().tolist())}
        folds.append(entry)
    return {"scheme": scheme, "speaker_independent": scheme != SplitScheme.RANDOM, "n_folds": len(folds), "seed": seed,
            "corpora": sorted(manifest["corpus"].unique().tolist()), "folds": folds}


def read_split(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read ``splits.csv`` and its sidecar; a CSV without sidecar gets ``scheme: unknown``.

    Raises:
        ValueError: the CSV lacks the ``fold, id, partition`` columns, has an unknown partition, or an id twice in
            one fold.
    """
    path = Path(path)
    splits = read_table(path, required=["fold", "id", "partition"], what="split", dtype={"id": str})
    bad = ~splits["partition"].isin(PARTITIONS)
    if bad.any():
        raise ValueError(f"{path}: partition must be one of {PARTITIONS}; found {sorted(splits.loc[bad, 'partition'].unique())}.")
    repeated = splits[splits.duplicated(["fold", "id"], keep=False)]
    if len(repeated):
        first = repeated.iloc[0]
        raise ValueError(f"{path}: expected each id once per fold, found {repeated[['fold', 'id']].drop_duplicates().shape[0]} "
                         f"repeated (e.g. id {first['id']!r} in fold {first['fold']}, partitions "
                         f"{sorted(repeated.loc[(repeated['fold'] == first['fold']) & (repeated['id'] == first['id']), 'partition'])}"
                         "). Re-run the split stage (python -m pipeline.split) rather than editing its CSV.")
    sidecar = _sidecar(path)
    try:
        info = json.loads(sidecar.read_text()) if sidecar.exists() else {"scheme": "unknown",
                                                                          "speaker_independent": None}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{sidecar} is not valid JSON ({err}); expected the sidecar pipeline.split writes. "
                         "Re-run the split stage.") from None
    return splits, info


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.split", description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, type=existing_file)
    parser.add_argument("--scheme", required=True, choices=list(SplitScheme))
    parser.add_argument("--out", required=True, type=output_file, help="splits CSV; the sidecar JSON is written beside it")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--folds", type=positive_int, default=None, help="speaker_kfold: number of speaker groups")
    args = parser.parse_args(argv)
    manifest = read_table(args.manifest, required=["id", "speaker", "corpus", "emotion"], what="manifest",
                          dtype={"id": str, "speaker": str})
    try:
        dup = manifest["id"][manifest["id"].duplicated()]
        if len(dup):
            raise ValueError(f"{args.manifest}: expected unique ids, found {len(dup)} repeated (e.g. "
                             f"{dup.head(3).tolist()}). Rebuild the manifest (python -m pipeline.manifest).")
        splits = make_split(manifest, scheme=args.scheme, seed=args.seed, n_folds=args.folds)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    info = describe(splits, manifest, scheme=args.scheme, seed=args.seed)  # all computed before anything is written
    write_files({out: splits.to_csv(index=False), _sidecar(out): json.dumps(info, indent=2) + "\n"})
    for fold in info["folds"]:
        sizes = ", ".join(f"{p} {fold[p]['utterances']} ({len(fold[p]['speakers'])} spk)" for p in PARTITIONS)
        print(f"fold {fold['fold']}: {sizes}", file=sys.stderr)
    if not info["speaker_independent"]:
        print("warning: the random split is speaker-dependent; use it only to measure leakage.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
