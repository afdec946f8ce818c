"""The scores every system is judged by (the run directory records them, the comparison tests them).

``ua`` (unweighted accuracy) is the mean per-class recall over the classes present in a fold's test set
(balanced accuracy); ``wa`` (weighted accuracy) is plain accuracy; ``macro_f1`` averages the F1 of the labels
present in the fold's test set or predictions. Top-level figures are means over folds, ``*_std`` their
population standard deviations (``ddof=0``).

Example:
    >>> import numpy as np
    >>> scores(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))["ua"]
    0.75
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    balanced_accuracy_score,
    f1_score,
)

SCORES = ("ua", "wa", "macro_f1")


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """``ua``, ``wa`` and ``macro_f1`` of integer labels ``[N]``."""
    present = np.union1d(y_true, y_pred)
    return {
        "ua": float(balanced_accuracy_score(y_true, y_pred)),
        "wa": float(np.mean(y_true == y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
    }
