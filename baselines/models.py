"""Classical baselines on utterance-level features (eGeMAPS functionals, or pooled wav2vec2 layers).

Both are scikit-learn pipelines: standardisation fitted on the training rows, then a RandomForest (the
seed's baseline) or an RBF SVM with probability estimates, both class-balanced. The optional per-speaker
z-scoring (:func:`speaker_standardise`) is applied before them.

Example:
    >>> model = build_model("rf", seed=0).fit(X_train, y_train)     # doctest: +SKIP
    >>> model.predict_proba(X_test).shape                             # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC


def speaker_standardise(X: np.ndarray, groups: np.ndarray | None = None, *, eps: float = 1e-5) -> np.ndarray:
    """Z-score the rows ``X [N, D]`` of each speaker (``groups [N]``; ``None``: one speaker) with its own
    mean and std. Used before the pipelines for ``--normalisation speaker`` (test speakers' statistics)."""
    X = np.asarray(X, dtype=np.float64)
    groups = np.zeros(len(X)) if groups is None else np.asarray(groups)
    out = np.empty_like(X)
    for g in np.unique(groups):
        rows = groups == g
        out[rows] = (X[rows] - X[rows].mean(axis=0)) / np.maximum(X[rows].std(axis=0), eps)
    return out


def random_forest(*, seed: int = 0, n_estimators: int = 500, min_samples_leaf: int = 1,
                  max_features: str | float = "sqrt", n_jobs: int | None = None) -> Pipeline:
    """Standardiser + class-balanced RandomForest."""
    return make_pipeline(StandardScaler(), RandomForestClassifier(
        n_estimators=n_estimators, min_samples_leaf=min_samples_leaf, max_features=max_features,
        class_weight="balanced", random_state=seed, n_jobs=n_jobs))


def svm(*, seed: int = 0, C: float = 10.0, gamma: str | float = "scale") -> Pipeline:
    """Standardiser + class-balanced RBF SVM with sigmoid-calibrated (Platt) probabilities."""
    svc = SVC(C=C, gamma=gamma, kernel="rbf", class_weight="balanced", random_state=seed)
    return make_pipeline(StandardScaler(), CalibratedClassifierCV(svc, method="sigmoid", ensemble=False))


def logistic_regression(*, seed: int = 0, C: float = 1.0, max_iter: int = 2000) -> Pipeline:
    """Standardiser + class-balanced multinomial logistic regression: the per-layer probe's fast, linear
    classifier (a layer's score then says what a linear read-out of that layer finds)."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced",
                                                              random_state=seed))


#: Model name to factory; factories take keyword settings (``seed`` and the estimator's own).
MODELS: dict[str, Callable[..., Pipeline]] = {"rf": random_forest, "svm": svm, "logreg": logistic_regression}


def build_model(name: str, **settings) -> Pipeline:
    """Instantiate a registered baseline.

    Raises:
        ValueError: unknown name.
    """
    if name not in MODELS:
        raise ValueError(f"unknown baseline {name!r}; expected one of {sorted(MODELS)}.")
    return MODELS[name](**settings)
