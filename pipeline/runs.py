"""Reading run directories (``heads.train``, ``baselines.train``) and grouping them into named systems.

A *system* is one configuration: every ``protocol`` field but ``seed`` equal, and the same labels. Runs that
differ only in their seed are one system; its figures are means over all of their folds. A system's name is
``<system or model_feature_set>[+aug]@<split_scheme>``, e.g. ``conv_wav2vec2+aug@speaker_kfold``; when two
systems would share a name, the protocol fields that tell them apart are appended, e.g.
``rf_egemaps@speaker_kfold[label_set=four]``.

Example:
    >>> runs = [load_run(p) for p in ["data/runs/rf_egemaps", "data/runs/conv_egemaps"]]   # doctest: +SKIP
    >>> [s.name for s in group_systems(runs)]                                             # doctest: +SKIP
    ['rf_egemaps@speaker_kfold', 'conv_egemaps@speaker_kfold']
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.rundir import recover_run

PREDICTION_COLUMNS = ("id", "fold", "true", "pred")
#: Model names of the eGeMAPS RandomForest reference, compared after dropping case and punctuation.
RANDOM_FOREST = {"rf", "randomforest", "randomforestclassifier"}


@dataclass
class Run:
    """One run directory, read and checked.

    Attributes:
        path: the directory.
        metrics: ``metrics.json``.
        protocol: its ``protocol`` block.
        labels: class names in order.
        predictions: ``predictions.csv``.
        history: ``history.csv`` (heads) or None.
        layer_weights: ``layer_weights.json`` or None.
    """

    path: Path
    metrics: dict
    protocol: dict
    labels: list[str]
    predictions: pd.DataFrame
    history: pd.DataFrame | None = None
    layer_weights: dict | None = None


@dataclass
class System:
    """Runs of one configuration (several seeds, or one run).

    Attributes:
        name: unique display name.
        runs: the runs, in the order given.
        protocol: the shared protocol (``seed`` dropped).
        labels: class names.
        label_group: name of the comparable group (the label set, with its classes if two sets share a name).
    """

    name: str
    runs: list[Run]
    protocol: dict
    labels: list[str]
    label_group: str = ""

    @property
    def seeds(self) -> list:
        """Seeds of the runs."""
        return [r.protocol.get("seed") for r in self.runs]

    @property
    def slug(self) -> str:
        """The name made safe for file names."""
        return re.sub(r"[^A-Za-z0-9]+", "_", self.name).strip("_") or "system"

    @property
    def is_rf_egemaps(self) -> bool:
        """Whether this is the eGeMAPS RandomForest reference."""
        model = re.sub(r"[^a-z]", "", str(self.protocol.get("model", "")).lower())
        return model in RANDOM_FOREST and "egemaps" in str(self.protocol.get("feature_set", "")).lower()


def read_metrics(path: str | os.PathLike) -> dict:
    """``metrics.json`` of a run directory, parsed and checked for the keys every reader needs.

    Raises:
        FileNotFoundError: no ``metrics.json``.
        ValueError: not JSON (a write cut short), or no ``labels``/``protocol``/``folds``.
    """
    file = Path(path) / "metrics.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; expected a run directory written by heads.train or "
                                "baselines.train (metrics.json, predictions.csv). Run the train stage first, or "
                                "pass the right directory.")
    try:
        metrics = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); expected the metrics a trainer writes. The file is "
                         "damaged: re-run the train stage.") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"{file} holds a {type(metrics).__name__}; expected a JSON object. Re-run the train stage.")
    for key in ("labels", "protocol", "folds"):
        if key not in metrics:
            raise ValueError(f"{file} has no {key!r}; expected the run format of docs/ARCHITECTURE.md. "
                             "Re-run the train stage with the current code.")
    return metrics


def check_predictions(path: str | os.PathLike, metrics: dict, predictions: pd.DataFrame) -> None:
    """Refuse a ``predictions.csv`` that does not match its ``metrics.json``.

    Checked: the folds, each fold's ``n_test`` and the total, ids unique within each fold (a cross-corpus scheme
    may test one id in several folds), no empty cells (a file cut mid-line), labels inside ``labels``, and one
    finite probability column per label whose rows sum to 1.

    Raises:
        ValueError: naming the file and what differs.
    """
    file = Path(path) / "predictions.csv"
    redo = "The run is incomplete or damaged: re-run the train stage."
    labels = [str(x) for x in metrics["labels"]]
    missing = [c for c in [*PREDICTION_COLUMNS, *labels] if c not in predictions]
    if missing:
        raise ValueError(f"{file} lacks columns {missing}; expected {list(PREDICTION_COLUMNS)} and one probability "
                         f"column per label of metrics.json {labels}. {redo}")
    empty = predictions[[*PREDICTION_COLUMNS, *labels]].isna().any(axis=1)
    if empty.any():
        raise ValueError(f"{file}: {int(empty.sum())} rows have empty or unreadable cells (first at data row "
                         f"{int(empty.to_numpy().argmax()) + 1}); expected every cell filled. {redo}")
    unknown = sorted((set(predictions["true"]) | set(predictions["pred"])) - set(labels))
    if unknown:
        raise ValueError(f"{file} holds labels {unknown} that are not in metrics.json's labels {labels}; expected "
                         f"one label set per run. {redo}")
    try:
        proba = predictions[labels].to_numpy(dtype=float)
        folds = predictions["fold"].to_numpy(dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{file}: fold or probability cells that are not numbers; expected numbers. {redo}") from None
    bad = ~np.isfinite(proba).all(axis=1) | (np.abs(proba.sum(axis=1) - 1.0) > 1e-3) | (proba < 0).any(axis=1)
    if bad.any():
        first = int(bad.argmax())
        raise ValueError(f"{file}: {int(bad.sum())} rows have probabilities that are not finite, negative or do not "
                         f"sum to 1 (first: id {predictions['id'].iloc[first]!r}, sum {proba[first].sum():.6f}); "
                         f"expected class probabilities. {redo}")
    if not np.all(folds == np.round(folds)):
        raise ValueError(f"{file}: fold cells that are not whole numbers; expected fold indices. {redo}")
    claimed = {}
    for entry in metrics["folds"]:
        try:
            claimed[int(entry["fold"])] = int(entry["n_test"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{Path(path) / 'metrics.json'}: a fold entry without fold/n_test ({entry!r}); "
                             f"expected the run format of docs/ARCHITECTURE.md. {redo}") from None
    found = predictions.groupby(folds.astype(int)).size().to_dict()
    if set(found) != set(claimed):
        raise ValueError(f"{file} holds folds {sorted(found)}, but metrics.json lists folds {sorted(claimed)}; "
                         f"expected the same folds. {redo}")
    wrong = {k: (found[k], n) for k, n in claimed.items() if found[k] != n}
    if wrong:
        detail = ", ".join(f"fold {k}: {f} rows, n_test {n}" for k, (f, n) in sorted(wrong.items()))
        raise ValueError(f"{file} does not match metrics.json ({detail}); expected n_test rows per fold. {redo}")
    if "n_test" in metrics and int(metrics["n_test"]) != len(predictions):
        raise ValueError(f"{file} has {len(predictions)} rows, metrics.json says n_test {metrics['n_test']}; "
                         f"expected the same count. {redo}")
    twice = predictions.assign(_fold=folds.astype(int)).duplicated(["_fold", "id"])
    if twice.any():
        raise ValueError(f"{file}: {int(twice.sum())} ids appear twice in one fold, e.g. "
                         f"{predictions.loc[twice, 'id'].head(3).tolist()}; expected each test utterance once per "
                         f"fold. {redo}")


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory and check it against the contract in ``docs/ARCHITECTURE.md``.

    A run left half-swapped by a killed trainer is put back first (``pipeline.rundir.recover_run``).

    Args:
        path: the run directory.

    Returns:
        The :class:`Run`.

    Raises:
        FileNotFoundError: ``metrics.json`` or ``predictions.csv`` missing.
        ValueError: ``metrics.json`` damaged or without ``labels``/``protocol``/``folds``, or a
            ``predictions.csv`` that does not match it (:func:`check_predictions`).
    """
    path = recover_run(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; expected a run directory (metrics.json, predictions.csv). "
                                 "Pass the directory a trainer wrote.")
    metrics = read_metrics(path)
    if not (path / "predictions.csv").is_file():
        raise FileNotFoundError(f"{path / 'predictions.csv'} not found; expected a run directory written by "
                                "heads.train or baselines.train (metrics.json, predictions.csv). Run the train "
                                "stage first, or pass the right directory.")
    labels = [str(x) for x in metrics["labels"]]
    try:
        predictions = pd.read_csv(path / "predictions.csv", dtype={"id": str, "true": str, "pred": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / 'predictions.csv'} cannot be read as CSV ({err}); the file is damaged. "
                         "Re-run the train stage.") from None
    check_predictions(path, metrics, predictions)
    history = layer_weights = None
    try:
        if (path / "history.csv").is_file():
            history = pd.read_csv(path / "history.csv")
        if (path / "layer_weights.json").is_file():
            layer_weights = json.loads((path / "layer_weights.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:  # pandas' and json's parse errors are ValueErrors
        raise ValueError(f"{path}: history.csv or layer_weights.json cannot be read ({err}); the run is damaged. "
                         "Re-run the train stage.") from None
    return Run(path, metrics, dict(metrics["protocol"]), labels, predictions, history, layer_weights)


def base_name(protocol: dict) -> str:
    """``<system>[+aug]@<split_scheme>`` from a protocol (``<model>_<feature_set>`` when no ``system``)."""
    base = protocol.get("system") or f"{protocol.get('model', 'model')}_{protocol.get('feature_set', 'features')}"
    if augmented(protocol) and "aug" not in str(base):
        base = f"{base}+aug"
    return f"{base}@{protocol.get('split_scheme') or 'unknown_split'}"


def augmented(protocol: dict) -> bool:
    """Whether the protocol's ``augmentation`` is on (a bool, or a description other than none/off)."""
    value = protocol.get("augmentation")
    if isinstance(value, str):
        return value.strip().lower() not in {"", "none", "off", "false", "no", "0"}
    return bool(value)


def label_key(run: Run) -> tuple:
    """What makes scores comparable: the label set, calm merging and the classes themselves."""
    return (run.protocol.get("label_set"), bool(run.protocol.get("merge_calm")), tuple(run.labels))


def group_systems(runs: list[Run]) -> list[System]:
    """Group runs that differ only in ``seed`` into systems and give each a unique name.

    Args:
        runs: loaded runs; the order of first appearance is kept.

    Returns:
        The systems, each with its ``label_group``.

    Raises:
        ValueError: the same directory given twice.
    """
    paths = [r.path.resolve() for r in runs]
    twice = sorted({str(p) for p in paths if paths.count(p) > 1})
    if twice:
        raise ValueError(f"run directories {twice} were given more than once; expected each run once. "
                         "Drop the repeats.")
    groups: dict[str, list[Run]] = {}
    for run in runs:
        config = {k: v for k, v in run.protocol.items() if k != "seed"}
        key = json.dumps([config, list(label_key(run))], sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
    systems = []
    for members in groups.values():
        protocol = {k: v for k, v in members[0].protocol.items() if k != "seed"}
        systems.append(System(base_name(protocol), members, protocol, members[0].labels))
    _disambiguate(systems)
    keys = {label_key(s.runs[0]) for s in systems}
    for system in systems:
        name, _, labels = label_key(system.runs[0])
        same_name = [k for k in keys if k[0] == name]
        system.label_group = str(name) if len(same_name) == 1 else f"{name} ({', '.join(labels)})"
    return systems


def _disambiguate(systems: list[System]) -> None:
    by_name: dict[str, list[System]] = {}
    for system in systems:
        by_name.setdefault(system.name, []).append(system)
    for clash in (v for v in by_name.values() if len(v) > 1):
        fields = sorted({k for s in clash for k in s.protocol} | {"labels"})
        values = [{**s.protocol, "labels": s.labels} for s in clash]
        differ = [k for k in fields if len({json.dumps(v.get(k), default=str) for v in values}) > 1]
        differ = [k for k in differ if k != "labels"] or differ  # the classes only when nothing else tells
        for system, value in zip(clash, values, strict=True):
            system.name += "[" + ",".join(f"{k}={_short(value.get(k))}" for k in differ) + "]"


def _short(value) -> str:
    if isinstance(value, list | tuple):
        return "+".join(map(str, value))
    return str(value)
