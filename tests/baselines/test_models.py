"""Baseline estimators follow scikit-learn's rules."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

from baselines.models import ESTIMATORS, build_model


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimators_follow_sklearn_rules(name):
    model = build_model(name, seed=3)
    assert clone(model).get_params().keys() == model.get_params().keys()
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 4)), np.repeat([0, 1, 2], 20)
    X[:, 0] += 3 * y
    assert model.fit(X, y) is model
    assert model.predict_proba(X).shape == (60, 3) and (model.predict(X) == y).mean() > 0.9


def test_unknown_baseline_is_refused():
    with pytest.raises(ValueError, match="unknown baseline 'knn'"):
        build_model("knn")
