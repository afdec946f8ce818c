"""Classical baselines on utterance-level features (eGeMAPS functionals, or pooled wav2vec2 layers).

Both are scikit-learn pipelines: standardisation fitted on the training rows, then a RandomForest (the
seed's baseline) or an RBF SVM with probability estimates, both class-balanced. The optional per-speaker
z-scoring (``pipeline.normalisation.speaker_standardise``) is applied before them.

Example:
    >>> model = build_model("rf", seed=0).fit(X_train, y_train)     # doctest: +SKIP
    >>> model.predict_proba(X_test).shape                             # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC


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


#: Estimator name to factory; factories take keyword settings (``seed`` and the estimator's own).
ESTIMATORS: dict[str, Callable[..., Pipeline]] = {"rf": random_forest, "svm": svm, "logreg": logistic_regression}


def build_model(name: str, **settings) -> Pipeline:
    """Instantiate a registered baseline.

    Raises:
        ValueError: unknown name.
    """
    if name not in ESTIMATORS:
        raise ValueError(f"unknown baseline {name!r}; expected one of {sorted(ESTIMATORS)}.")
    return ESTIMATORS[name](**settings)
