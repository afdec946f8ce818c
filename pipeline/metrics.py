"""Scores and the run directory every trainer writes (``heads.train`` and ``baselines.train`` alike).

``ua`` (unweighted accuracy) is the mean per-class recall over the classes present in a fold's test set
(balanced accuracy); ``wa`` (weighted accuracy) is plain accuracy; ``macro_f1`` averages the F1 of the labels
present in the fold's test set or predictions. Top-level figures are means over folds, ``*_std`` their
population standard deviations (``ddof=0``). The layout is the contract in ``docs/ARCHITECTURE.md``.

Example:
    >>> write_run("data/runs/rf_egemaps", labels=labels, predictions=pred, protocol=protocol)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
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


def prediction_frame(ids, fold: int, y_true: np.ndarray, proba: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """One fold's rows of ``predictions.csv``: ``id, fold, true, pred`` and a probability column per label."""
    frame = pd.DataFrame({"id": list(ids), "fold": fold,
                          "true": [labels[i] for i in y_true],
                          "pred": [labels[i] for i in proba.argmax(axis=1)]})
    return pd.concat([frame, pd.DataFrame(proba, columns=labels)], axis=1)


def summarise(predictions: pd.DataFrame, labels: list[str], speakers: pd.Series) -> dict:
    """Fold figures, their means and stds, the summed confusion matrix and per-class figures.

    Args:
        predictions: rows of :func:`prediction_frame` for every fold.
        labels: label order.
        speakers: speaker of every id (index ``id``).
    """
    index = {name: i for i, name in enumerate(labels)}
    folds = []
    for fold, group in predictions.groupby("fold", sort=True):
        y_true, y_pred = group["true"].map(index).to_numpy(), group["pred"].map(index).to_numpy()
        folds.append({"fold": int(fold), **scores(y_true, y_pred), "n_test": len(group),
                      "test_speakers": sorted(speakers.loc[group["id"]].unique().tolist())})
    y_true, y_pred = predictions["true"].map(index).to_numpy(), predictions["pred"].map(index).to_numpy()
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=range(len(labels)), zero_division=0)
    summary = {}
    for key in SCORES:
        values = np.array([f[key] for f in folds])
        summary[key], summary[f"{key}_std"] = float(values.mean()), float(values.std())
    return {
        **summary,
        "labels": labels,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=range(len(labels))).tolist(),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(labels)},
        "folds": folds,
        "n_test": len(predictions),
        "n_speakers": int(speakers.loc[predictions["id"]].nunique()),
    }


def write_run(out: str | os.PathLike, *, labels: list[str], predictions: pd.DataFrame, speakers: pd.Series,
              protocol: dict, history: pd.DataFrame | None = None, layer_weights: dict | None = None,
              fold_extras: dict[int, dict] | None = None) -> dict:
    """Write ``metrics.json``, ``predictions.csv`` and, when given, ``history.csv`` and ``layer_weights.json``.

    Args:
        out: the run directory (created).
        labels: label order.
        predictions: every fold's :func:`prediction_frame` rows.
        speakers: speaker of every id (index ``id``).
        protocol: the ``protocol`` block.
        history: ``fold, epoch, train_loss, val_loss, val_acc`` rows.
        layer_weights: ``{"layers": [...], "folds": [[...], ...]}``; the mean is added here.
        fold_extras: more figures per fold (e.g. ``best_epoch``), merged into ``folds``.

    Returns:
        The metrics written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = summarise(predictions, labels, speakers)
    for entry in metrics["folds"]:
        entry.update((fold_extras or {}).get(entry["fold"], {}))
    metrics["protocol"] = protocol
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    predictions.to_csv(out / "predictions.csv", index=False, float_format="%.6f")
    if history is not None:
        history.to_csv(out / "history.csv", index=False, float_format="%.6f")
    if layer_weights is not None:
        mean = np.mean(np.asarray(layer_weights["folds"], dtype=float), axis=0).tolist()
        (out / "layer_weights.json").write_text(json.dumps({**layer_weights, "mean": mean}, indent=2) + "\n")
    return metrics
