"""Two audits across systems: speaker leakage (``random`` vs. speaker-independent split) and cross-corpus UA.

Both take the per-system results of ``pipeline.compare`` (``result.system``, ``result.row``) and return frames
that ``evaluation.report`` writes as ``leakage.csv`` / ``cross_corpus.csv`` and as tables in ``report.md``.

Cross-corpus cells need runs that say which corpora they trained on: a run's ``protocol.train_corpora`` (a list,
or ``{fold: list}`` for a split that holds out one corpus per fold) or else its ``protocol.corpora``; the test
corpus of an utterance comes from the manifest (``--manifest``) or the prefix of its id.

Example:
    >>> leakage(results)                               # doctest: +SKIP
    >>> cross_corpus(results, lambda uid: uid.split("/")[0])   # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pandas as pd

from evaluation import stats
from evaluation.results import Result
from evaluation.systems import what_it_computes
from pipeline.split import SplitScheme

#: The protocol keys that define a system, on which the leakage audit pairs a system with itself across splits.
#: Everything that describes the split instead (scheme, folds, ``train_corpora`` per fold, seed) and the
#: display name (``system``) are left out.
SYSTEM_KEYS = ("model", "feature_set", "features", "encoder", "label_set", "merge_calm", "normalisation",
               "augmentation", "corpora", "layers", "probe_layer", "settings", "balance", "ensemble")


def leakage(results: list[Result]) -> pd.DataFrame:
    """The same system under a speaker-dependent split (``random``) and a speaker-independent one, side by side.

    Two results are the same system when their protocols agree on :data:`SYSTEM_KEYS` and their labels agree.
    """
    columns = ["system", "label_set", "leaky_split", "leaky_ua", "split", "ua", "ua_diff",
               "leaky_macro_f1", "macro_f1", "macro_f1_diff", "leaky_n_test", "n_test"]
    pairs: dict[tuple, list[Result]] = {}
    for r in results:
        pairs.setdefault((r.system.label_group, configuration(r)), []).append(r)
    rows = []
    for members in pairs.values():
        leaky = [r for r in members if not independent(r.system.protocol)]
        honest = [r for r in members if independent(r.system.protocol)]
        for hr in honest:
            name = hr.system.protocol.get("system")
            named = [lk for lk in leaky if lk.system.protocol.get("system") in {name, f"{name}_{SplitScheme.RANDOM}"}]
            for lk in named or leaky:  # one configuration under several names: each with its own name first
                rows.append({"system": display_name(hr), "label_set": hr.system.label_group,
                             "leaky_split": lk.row["split_scheme"], "leaky_ua": lk.row["ua"],
                             "split": hr.row["split_scheme"], "ua": hr.row["ua"],
                             "ua_diff": lk.row["ua"] - hr.row["ua"], "leaky_macro_f1": lk.row["macro_f1"],
                             "macro_f1": hr.row["macro_f1"], "macro_f1_diff": lk.row["macro_f1"] - hr.row["macro_f1"],
                             "leaky_n_test": lk.row["n_test"], "n_test": hr.row["n_test"]})
    return pd.DataFrame(rows, columns=columns)


def cross_corpus(results: list[Result], corpus_of: Callable[[str], str]) -> pd.DataFrame:
    """UA of training corpora (rows) against test corpora (columns), from speaker-independent runs.

    A run's training corpora are its protocol's ``train_corpora`` (a list, or ``{fold: list}`` for schemes
    that hold out a corpus per fold), else its ``corpora``; the test corpus of an utterance is ``corpus_of(id)``.
    A cell is the fold-mean UA over the runs (seeds) that fill it. Empty unless two corpora appear.
    """
    columns = ["system", "label_set", "train", "test", "ua", "n_test", "n_runs", "splits"]
    cells: dict[tuple, list] = {}
    names: dict[tuple, str] = {}  # one configuration (its splits pooled) is one matrix, named as its first system
    for r in results:
        p = r.system.protocol
        if not independent(p):
            continue
        config = (configuration(r), r.system.label_group)
        if config not in names:  # a name no other matrix of the label set has: the split's, or the full name
            taken = {n for c, n in names.items() if c[1] == config[1]}
            names[config] = next((n for n in (display_name(r), r.system.name) if n not in taken),
                                 f"{r.system.name} ({len(taken) + 1})")
        for run in r.system.runs:
            train = run.protocol.get("train_corpora", run.protocol.get("corpora")) or []
            frame = run.predictions.assign(test=run.predictions["id"].map(corpus_of))
            frame["train"] = [_corpora(train, fold) for fold in frame["fold"]]
            for (tr, te), cell in frame.groupby(["train", "test"]):
                key = (config, tr, te)
                cells.setdefault(key, []).append((cell, p.get("split_scheme")))
    corpora = {c for key in cells for c in key[1].split("+") + [key[2]]}
    if len(corpora) < 2:
        return pd.DataFrame(columns=columns)
    rows = []
    for (config, tr, te), members in cells.items():
        structure = stats.ua_structure([m[0] for m in members])
        rows.append({"system": names[config], "label_set": config[1], "train": tr, "test": te, "ua": structure.ua,
                     "n_test": len(structure.ids), "n_runs": len(members),
                     "splits": " ".join(sorted({str(m[1]) for m in members}))})
    return pd.DataFrame(rows, columns=columns)


def configuration(result: Result) -> str:
    """What makes two results one system for the audits: their protocols' :data:`SYSTEM_KEYS` (settings that
    change only how fast a run computes left out, as ``evaluation.systems`` groups runs)."""
    protocol = what_it_computes(result.system.protocol)
    return json.dumps({k: protocol.get(k) for k in SYSTEM_KEYS}, sort_keys=True, default=str)


def display_name(result: Result) -> str:
    """A system's name without its split (``conv_wav2vec2@speaker_kfold[lr=0.01]`` -> ``conv_wav2vec2[lr=0.01]``)."""
    return re.sub(r"@[^\[]*", "", result.system.name, count=1)


def independent(protocol: dict) -> bool:
    """Whether a protocol's split is speaker-independent (unrecorded: any scheme but ``random``)."""
    value = protocol.get("speaker_independent")
    return bool(value) if value is not None else protocol.get("split_scheme") != SplitScheme.RANDOM


def _corpora(train, fold) -> str:
    if isinstance(train, dict):
        train = train.get(str(fold), train.get(fold, []))
    if isinstance(train, str):
        train = [train]
    return "+".join(sorted(map(str, train)))
