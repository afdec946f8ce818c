"""Bootstrap interval and paired permutation test of UA (pipeline.stats)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from evaluation.stats import bootstrap_ci, paired_permutation_test, ua_structure

LABELS = ["neutral", "happy", "sad", "angry"]


def predictions(*, n: int = 120, folds: int = 3, accuracy: float = 0.6, seed: int = 0,
                truth_seed: int = 0) -> pd.DataFrame:
    """``id, fold, true, pred`` with a given share of correct predictions (truth fixed by ``truth_seed``)."""
    truth_rng, rng = np.random.default_rng(truth_seed), np.random.default_rng(seed)
    true = truth_rng.integers(0, len(LABELS), n)
    wrong = (true + rng.integers(1, len(LABELS), n)) % len(LABELS)
    pred = np.where(rng.random(n) < accuracy, true, wrong)
    true, pred = np.array(LABELS)[true], np.array(LABELS)[pred]
    return pd.DataFrame({"id": [f"c/u{i:04d}" for i in range(n)], "fold": np.arange(n) % folds,
                         "true": true, "pred": pred})


def fold_mean_ua(frames: list[pd.DataFrame]) -> float:
    return float(np.mean([balanced_accuracy_score(g["true"], g["pred"])
                          for f in frames for _, g in f.groupby("fold")]))


@pytest.mark.parametrize("runs", [1, 3])
def test_structure_sums_to_the_fold_mean_ua(runs):
    frames = [predictions(seed=s) for s in range(runs)]
    assert ua_structure(frames).ua == pytest.approx(fold_mean_ua(frames), abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("n", [12, 40, 400])
def test_bootstrap_interval_contains_the_point_estimate(seed, n):
    s = ua_structure([predictions(n=n, seed=seed, accuracy=0.3 + 0.08 * seed)])
    low, high = bootstrap_ci(s, resamples=400, seed=seed)
    assert low <= s.ua <= high
    assert 0 <= low <= high <= 1


def test_bootstrap_is_reproducible_and_narrows_with_more_utterances():
    small, large = ua_structure([predictions(n=60)]), ua_structure([predictions(n=1200)])
    assert bootstrap_ci(small, resamples=300, seed=1) == bootstrap_ci(small, resamples=300, seed=1)
    width = [np.subtract(*bootstrap_ci(s, resamples=300, seed=1)[::-1]) for s in (small, large)]
    assert width[1] < width[0]


def test_perfect_predictions_give_a_degenerate_interval_at_one():
    frame = predictions(accuracy=1.0)
    low, high = bootstrap_ci(ua_structure([frame]), resamples=200)
    assert (low, high) == pytest.approx((1.0, 1.0))
    assert low <= ua_structure([frame]).ua <= high


@pytest.mark.parametrize("runs", [1, 2])
def test_identical_predictions_give_p_one(runs):
    frames = [predictions(seed=s) for s in range(runs)]
    a, b = ua_structure(frames), ua_structure([f.copy() for f in frames])
    assert paired_permutation_test(a, b, resamples=500, seed=3) == 1.0


def test_clearly_different_systems_give_a_small_p_and_the_test_is_symmetric():
    good, bad = ua_structure([predictions(n=400, accuracy=0.9)]), ua_structure([predictions(n=400, accuracy=0.3)])
    p = paired_permutation_test(good, bad, resamples=500, seed=0)
    assert p == pytest.approx(1 / 501)
    assert paired_permutation_test(bad, good, resamples=500, seed=0) == p


def test_similar_systems_give_a_large_p():
    a = ua_structure([predictions(n=200, accuracy=0.6, seed=1)])
    b = ua_structure([predictions(n=200, accuracy=0.6, seed=2)])
    assert paired_permutation_test(a, b, resamples=500) > 0.05


def test_paired_test_refuses_different_utterances():
    a = ua_structure([predictions(n=50)])
    b = ua_structure([predictions(n=60)])
    with pytest.raises(ValueError, match="same utterances"):
        paired_permutation_test(a, b, resamples=10)


def test_an_id_tested_twice_in_one_fold_is_refused():
    frame = predictions(n=10)
    with pytest.raises(ValueError, match="more than once in one fold"):
        ua_structure([pd.concat([frame, frame])])


def test_an_id_tested_in_several_folds_is_one_unit_per_fold():
    """Cross-corpus splits test an utterance in every fold that does not train on its corpus."""
    frame = predictions(n=12, folds=1)
    twice = pd.concat([frame, frame.assign(fold=1, pred=frame["true"])])
    structure = ua_structure([twice])
    assert len(structure.ids) == 24 and structure.ua == pytest.approx(fold_mean_ua([twice]))
    low, high = bootstrap_ci(structure, resamples=200, seed=0)
    assert low <= structure.ua <= high


def test_true_labels_must_agree_between_runs():
    frame = predictions(n=10)
    other = frame.assign(true=np.roll(frame["true"].to_numpy(), 1))
    with pytest.raises(ValueError, match="true labels"):
        ua_structure([frame, other])


@pytest.mark.parametrize(("resamples", "level"), [(0, 0.95), (10, 1.5)])
def test_bad_settings_are_refused(resamples, level):
    with pytest.raises(ValueError, match="expected"):
        bootstrap_ci(ua_structure([predictions(n=10)]), resamples=resamples, level=level)
