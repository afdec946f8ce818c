"""Uncertainty of UA over test utterances: a bootstrap confidence interval and a paired permutation test.

The statistic is exactly the ``ua`` a run reports (``pipeline.metrics``): the mean over folds (and over the
runs of one system, e.g. several seeds) of each fold's balanced accuracy, the mean recall of the classes present
in that fold's test set. With the test utterances fixed by the split, that statistic is a weighted sum of
per-utterance correctness::

    ua = sum_i s_i,   s_i = sum_r a_ri * correct_ri,   a_ri = 1 / (P * K_rf * n_rfk)

for utterance ``i`` (a test unit: an utterance that a cross-corpus split tests in several folds is one unit
per fold, see :func:`test_units`) tested in fold ``f`` of run ``r`` with true class ``k`` (``P`` (run, fold) pairs, ``K_rf``
classes in the fold, ``n_rfk`` utterances of class ``k`` in it).

* :func:`bootstrap_ci` resamples utterances with replacement within strata of equal class and equal fold in
  every run (so each fold keeps its class counts, as the split fixed them). The resampled statistic stays
  ``sum_i w_i s_i`` (``w_i`` the resample counts); its mean is the point estimate, and the percentile interval
  is reported. An utterance keeps all its runs' predictions together, so seeds are not mistaken for new
  test data.
* :func:`paired_permutation_test` (approximate randomisation) swaps, utterance by utterance, which system
  made which predictions, and counts how often the absolute UA difference is at least the observed one.
  Identical predictions give ``p = 1`` exactly; the smallest possible ``p`` is ``1 / (resamples + 1)``.

We chose the permutation test over McNemar's because McNemar tests plain accuracy (``wa``), not the UA of
the table, and has no natural form for several seeds or for the per-class weighting of UA.

Example:
    >>> s = ua_structure([predictions], labels)                   # doctest: +SKIP
    >>> bootstrap_ci(s, resamples=2000, seed=0)                    # doctest: +SKIP
    (0.61, 0.68)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: Floating-point slack when checking that an interval holds its point estimate (sums in another order).
_EPS = 1e-9
_CHUNK = 512


@dataclass(frozen=True)
class UAStructure:
    """UA of a system written as a sum over its test utterances.

    Attributes:
        ids: test utterance ids, sorted ``[N]``.
        weight: ``W_i = sum_r a_ri``, what utterance ``i`` would add if every run got it right ``[N]``.
        score: ``s_i = sum_r a_ri * correct_ri`` ``[N]``; ``score.sum()`` is the UA.
        strata: resampling stratum of each utterance (true class and fold in every run) ``[N]``.
    """

    ids: np.ndarray
    weight: np.ndarray
    score: np.ndarray
    strata: np.ndarray

    @property
    def ua(self) -> float:
        """The point estimate: the mean over (run, fold) of each fold's UA."""
        return float(self.score.sum())


def ua_structure(predictions: Sequence[pd.DataFrame]) -> UAStructure:
    """Write the fold-mean UA of one or more runs as a sum over test utterances.

    Args:
        predictions: each run's ``predictions.csv`` frame (``id, fold, true, pred``), one per run (seed).

    Returns:
        The :class:`UAStructure`.

    Raises:
        ValueError: no prediction, an id tested twice within one fold, or an utterance whose true label
            differs between runs.
    """
    if not predictions or all(len(p) == 0 for p in predictions):
        raise ValueError("expected at least one run with test predictions, found none; pass run directories "
                         "whose predictions.csv has rows.")
    predictions = [test_units(frame, r) for r, frame in enumerate(predictions)]
    ids = np.array(sorted(set().union(*(set(p["id"]) for p in predictions))), dtype=object)
    index = pd.Index(ids)
    n_pairs = sum(p["fold"].nunique() for p in predictions)
    weight, score = np.zeros(len(ids)), np.zeros(len(ids))
    truth = pd.Series(index=index, dtype=object)
    folds = []
    for r, frame in enumerate(predictions):
        pos = index.get_indexer(frame["id"])
        seen = truth.iloc[pos]
        clash = seen.notna().to_numpy() & (seen.to_numpy() != frame["true"].to_numpy())
        if clash.any():
            raise ValueError(f"run {r}: true labels of {frame['id'][clash].head(3).tolist()} differ from another "
                             "run's; expected the same labels for the same ids. Compare runs of one manifest.")
        truth.iloc[pos] = frame["true"].to_numpy()
        fold_of = np.full(len(ids), -1)
        fold_of[pos] = frame["fold"].to_numpy()
        folds.append(fold_of)
        for _, group in frame.groupby("fold"):
            classes = group.groupby("true")
            for _, cell in classes:
                a = 1.0 / (n_pairs * classes.ngroups * len(cell))
                at = index.get_indexer(cell["id"])
                weight[at] += a
                score[at] += a * (cell["true"].to_numpy() == cell["pred"].to_numpy())
    keys = pd.DataFrame({"true": truth.to_numpy(), **{f"f{r}": f for r, f in enumerate(folds)}})
    strata = keys.groupby(list(keys.columns), sort=True).ngroup().to_numpy()
    return UAStructure(ids, weight, score, strata)


def test_units(frame: pd.DataFrame, run: int = 0) -> pd.DataFrame:
    """The run's predictions keyed by test unit: the id, or ``id@fold<k>`` when the run tests ids in several folds.

    Schemes that hold out one corpus per fold (``cross_corpus``) test an utterance once in every fold that does
    not train on its corpus; each such test is a unit of its own (resampled and paired as one).

    Raises:
        ValueError: an id tested twice within one fold.
    """
    twice = frame[frame.duplicated(["id", "fold"])]
    if len(twice):
        raise ValueError(f"run {run}: ids {twice['id'].head(3).tolist()} are tested more than once in one fold; "
                         "expected each id at most once per fold. Check the run's split.")
    if not frame["id"].duplicated().any():
        return frame
    return frame.assign(id=frame["id"].astype(str) + "@fold" + frame["fold"].astype(str))


def bootstrap_ci(structure: UAStructure, *, resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the fold-mean UA over test utterances, stratified as described above.

    Args:
        structure: from :func:`ua_structure`.
        resamples: bootstrap resamples.
        seed: seed of the resampling (the same seed gives the same interval).
        level: coverage of the interval.

    Returns:
        ``(low, high)``, with ``low <= structure.ua <= high``.

    Raises:
        ValueError: fewer than one resample or a level outside (0, 1).
    """
    _check(resamples, level)
    rng = np.random.default_rng(seed)
    stats = np.zeros(resamples)
    for stratum in np.unique(structure.strata):
        s = structure.score[structure.strata == stratum]
        for start in range(0, len(s), _CHUNK):  # draws of a large stratum, a block of columns at a time
            width = min(_CHUNK, len(s) - start)
            stats += s[rng.integers(0, len(s), size=(resamples, width))].sum(axis=1)
    low, high = np.clip(np.quantile(stats, [(1 - level) / 2, (1 + level) / 2]), 0.0, 1.0)
    ua = structure.ua
    # The resampled statistic is centred on ua; only rounding (a sum taken in another order) can put ua
    # a hair outside a degenerate interval (e.g. every resample equal). Larger gaps are reported, not hidden.
    if low - _EPS <= ua < low:
        low = ua
    if high < ua <= high + _EPS:
        high = ua
    return float(low), float(high)


def paired_permutation_test(a: UAStructure, b: UAStructure, *, resamples: int = 2000, seed: int = 0) -> float:
    """Two-sided paired permutation test of the UA difference of two systems on the same test utterances.

    Args:
        a, b: structures of the two systems, over the same ids.
        resamples: random swaps.
        seed: seed of the swaps.

    Returns:
        ``p = (1 + #{|d*| >= |d|}) / (1 + resamples)``; exactly 1 when the predictions are identical.

    Raises:
        ValueError: the systems were tested on different utterances.
    """
    _check(resamples, 0.5)
    if len(a.ids) != len(b.ids) or not np.array_equal(a.ids, b.ids):
        only_a, only_b = sorted(set(a.ids) - set(b.ids)), sorted(set(b.ids) - set(a.ids))
        raise ValueError(f"expected both systems tested on the same utterances, found {len(only_a)} only in the "
                         f"first (e.g. {only_a[:3]}) and {len(only_b)} only in the second (e.g. {only_b[:3]}); "
                         "a paired test needs runs of the same split.")
    kept = a.score - b.score
    with np.errstate(invalid="ignore", divide="ignore"):
        ca = np.where(a.weight > 0, a.score / a.weight, 0.0)
        cb = np.where(b.weight > 0, b.score / b.weight, 0.0)
    swapped = a.weight * cb - b.weight * ca
    observed = abs(kept.sum())
    rng = np.random.default_rng(seed)
    diff = np.full(resamples, kept.sum())
    change = swapped - kept  # what swapping utterance i adds to the difference
    for start in range(0, len(change), _CHUNK):
        block = change[start:start + _CHUNK]
        diff += (rng.random((resamples, len(block))) < 0.5) @ block
    extreme = np.count_nonzero(np.abs(diff) >= observed - _EPS)
    return float((1 + extreme) / (1 + resamples))


def _check(resamples: int, level: float) -> None:
    if int(resamples) < 1:
        raise ValueError(f"expected a positive number of resamples, found {resamples}; use e.g. 2000.")
    if not 0 < level < 1:
        raise ValueError(f"expected a confidence level in (0, 1), found {level}; use e.g. 0.95.")
