"""The run directory: the one contract between trainers, the comparison and prediction.

Every trainer (``heads.train``, ``baselines.train``, ``baselines.probe``) writes a run directory through this
module, ``pipeline.compare`` reads it (:func:`load_run`), and ``heads.predict`` loads its fold models
(:meth:`Run.fold_models`). The layout is documented in ``docs/ARCHITECTURE.md``:

- ``metrics.json`` (:func:`fold_metrics` + ``protocol``), ``predictions.csv`` (:func:`prediction_frame` rows),
  ``history.csv``, ``layer_weights.json`` (:func:`write_run`);
- ``models/fold_<k>.safetensors`` + ``.json`` per fold for torch models (``fold_<k>_<m>`` per member ``m`` of an
  ensemble), or ``models/fold_<k>.joblib`` for scikit-learn ones (:func:`save_torch_fold`,
  :func:`save_sklearn_fold`).

Writing is transactional (:func:`staged_run`): a trainer writes the whole run into a staging sibling
``.<name>.tmp-<pid>`` of the run directory ``<name>`` and only a complete run is committed, by renames:

1. the old run ``<name>`` → ``.<name>.old-<pid>`` (if there is one),
2. the staging folder → ``<name>``,
3. the old run is deleted.

A failure or kill before step 1 leaves the old run exactly as it was (the staging folder is removed on a
failure; after a kill it stays until the next run into the same place removes it). A kill between steps 1
and 2 leaves no ``<name>`` but a whole ``.<name>.old-<pid>``: :func:`recover_run` (called by :func:`load_run`
and by the next trainer) renames it back. A kill during step 3 leaves a stale ``.old-<pid>`` beside a
complete run, which the next run removes. Files in the old run directory that no trainer writes (such as the
``.gitignore`` DVC keeps beside its outputs) are carried into the new one.

Reading checks the run (:func:`load_run`): ``predictions.csv`` against ``metrics.json`` (folds, ``n_test``
per fold, each id once per fold, every cell filled, probabilities finite and summing to 1), and
:meth:`Run.fold_models` the models against ``metrics.json`` (every fold, ``ensemble`` members each).

Example:
    >>> with staged_run("data/runs/rf_egemaps") as tmp:                       # doctest: +SKIP
    ...     save_sklearn_fold(tmp, 0, payload)
    ...     write_run(tmp, labels=labels, predictions=pred, speakers=spk, protocol=protocol)
    >>> run = load_run("data/runs/rf_egemaps")                                # doctest: +SKIP
    >>> run.metrics["ua"], [m.name for m in run.fold_models()]                # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import joblib
import numpy as np
import pandas as pd
from safetensors import SafetensorError
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from pipeline.metrics import SCORES, scores
from pipeline.outputs import leftovers, put_back, swap_in

if TYPE_CHECKING:  # torch is imported where models are saved or loaded: reading runs (compare) needs none
    import torch

PREDICTION_COLUMNS = ("id", "fold", "true", "pred")
#: The folder of a run directory that holds the fold models.
MODELS_DIR = "models"


# --- writing: staged, committed whole ---

#: What a trainer writes into a run directory; everything else in an old run is carried over.
RUN_ENTRIES = frozenset({"metrics.json", "predictions.csv", "history.csv", "layer_weights.json", MODELS_DIR})


def recover_run(out: str | os.PathLike) -> Path:
    """Put back a run left half-swapped by a killed trainer; return the run directory's path.

    When ``out`` is missing and a ``.<name>.old-<pid>`` sibling holds a previous run, or a probe's folder of
    runs (a kill between the two renames of a commit), it is renamed back to ``out``. Nothing else is touched.
    """
    return put_back(Path(out), accept=lambda old: (old / "metrics.json").is_file()  # a run, or a probe's folder
                    or any(old.glob("*/metrics.json")))


def clean_stale(out: str | os.PathLike) -> list[Path]:
    """Remove staging folders of trainers that no longer run and old runs already replaced; return them."""
    out = recover_run(out)
    removed = leftovers(out, "tmp") + (leftovers(out, "old") if out.exists() else [])
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _commit(tmp: Path, out: Path, keep_foreign: bool = True) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; expected a run directory (or nothing) there. Remove the file "
                                 "or choose another --out.")
    swap_in(tmp, out, carry=lambda entry: keep_foreign and entry.name not in RUN_ENTRIES)


@contextlib.contextmanager
def staged_run(out: str | os.PathLike, *, keep_foreign: bool = True, owned: str | None = None) -> Iterator[Path]:
    """Yield a fresh staging folder for the run ``out``; on normal exit swap it in, on an exception remove it.
    ``keep_foreign``: carry files of the old ``out`` that a trainer does not write (a ``.gitignore``, say) into
    the new one; False where everything in ``out`` is the writer's (a probe's folder of per-layer runs): then
    ``owned``, a regular expression, names what the writer writes there, and an ``out`` holding anything else is
    refused, not replaced (a mistyped ``--out`` would otherwise delete another folder's contents).

    Raises:
        NotADirectoryError: ``out`` (or a folder above it) is an existing file; checked before any work.
        ValueError: ``out`` holds entries ``owned`` does not match; checked before any work.
    """
    out = Path(out)
    for candidate in (out, *out.parents):
        if candidate.exists() and not candidate.is_dir():
            raise NotADirectoryError(f"{candidate} is a file; expected a run directory {out} (or nothing) "
                                     "there. Remove the file or choose another --out.")
    if not keep_foreign and owned is not None and out.is_dir():
        foreign = sorted(e.name for e in out.iterdir() if not re.fullmatch(owned, e.name))
        if foreign:
            raise ValueError(f"--out {out}: expected a folder this stage wrote (entries matching {owned!r}) or "
                             f"nothing, found {len(foreign)} other entries (e.g. {foreign[:3]}), which replacing it "
                             "would delete. Choose another --out, or move them away.")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _commit(tmp, out, keep_foreign)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prediction_frame(ids, fold: int, y_true: np.ndarray, proba: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """One fold's rows of ``predictions.csv``: ``id, fold, true, pred`` and a probability column per label."""
    frame = pd.DataFrame({"id": list(ids), "fold": fold,
                          "true": [labels[i] for i in y_true],
                          "pred": [labels[i] for i in proba.argmax(axis=1)]})
    return pd.concat([frame, pd.DataFrame(proba, columns=labels)], axis=1)


def fold_metrics(predictions: pd.DataFrame, labels: list[str], speakers: pd.Series) -> dict:
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

    Raises:
        ValueError: a probability that is not finite (nothing is written).
    """
    proba = predictions[list(labels)].to_numpy(dtype=float)
    bad = ~np.isfinite(proba).all(axis=1)
    if bad.any():  # refused before anything is written: the staged run is dropped, an earlier run stays
        folds = sorted(set(predictions.loc[bad, "fold"].tolist()))
        raise ValueError(f"{int(bad.sum())} test rows (folds {folds}) got probabilities that are not finite; "
                         "expected finite outputs: the training diverged, or features hold NaN/inf. Lower the "
                         "learning rate (--lr) or check the features; the previous run, if any, is kept.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = fold_metrics(predictions, labels, speakers)
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


def save_torch_fold(out: str | os.PathLike, fold: int, model: torch.nn.Module, config: dict,
                    member: int | None = None) -> None:
    """Write ``models/fold_<k>.safetensors`` (``fold_<k>_<m>`` for member ``m`` of an ensemble) and its JSON
    ``config`` (``kind, model, model_kwargs, labels, normalisation, feature_settings``, anything else useful
    such as ``best_epoch``)."""
    from safetensors.torch import save_file

    folder = Path(out) / MODELS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = f"fold_{fold}" if member is None else f"fold_{fold}_{member}"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps({"fold": fold, **config}, indent=1) + "\n")


def save_sklearn_fold(out: str | os.PathLike, fold: int, payload: dict) -> None:
    """Write ``models/fold_<k>.joblib``: ``kind, model, estimator, labels, normalisation, feature_settings``."""
    folder = Path(out) / MODELS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    joblib.dump({"fold": fold, **payload}, folder / f"fold_{fold}.joblib")


# --- reading: checked against the contract ---

@dataclass
class FoldModel:
    """One saved model of a run: fold ``k`` (member ``m`` of an ensemble), as the trainer saved it.

    Attributes:
        name: ``fold_<k>`` or ``fold_<k>_<m>``.
        config: the JSON beside a torch state dict (``fold, member, kind, model, model_kwargs, labels,
            normalisation, feature_settings``, ...), or the joblib payload of a scikit-learn model (the same
            keys, ``classes``, ``settings`` and the fitted ``estimator``).
        state_dict: the torch weights (``None`` for scikit-learn).
    """

    name: str
    config: dict
    state_dict: dict[str, torch.Tensor] | None = None

    @property
    def estimator(self):
        """The fitted scikit-learn pipeline (``None`` for torch models)."""
        return self.config.get("estimator")


@dataclass
class Run:
    """One run directory, read and checked.

    Attributes:
        path: the directory.
        metrics: ``metrics.json``.
        protocol: its ``protocol`` block.
        labels: class names in order.
        predictions: ``predictions.csv``.
        history: ``history.csv`` (torch models) or None.
        layer_weights: ``layer_weights.json`` or None.
    """

    path: Path
    metrics: dict
    protocol: dict
    labels: list[str]
    predictions: pd.DataFrame
    history: pd.DataFrame | None = None
    layer_weights: dict | None = None

    def fold_models(self) -> list[FoldModel]:
        """Every saved model, in fold then member order, checked against ``metrics.json``: one per fold
        (``ensemble`` per fold for torch ensembles), none missing and none left over, so a run never predicts
        from part of its folds.

        Raises:
            FileNotFoundError: no fold models in ``models/``.
            ValueError: models that do not match ``metrics.json``, or a damaged model file.
        """
        folder = self.path / MODELS_DIR
        order = lambda p: [int(n) for n in p.stem.split("_")[1:]]  # noqa: E731 (fold, then member)
        configs = sorted(folder.glob("fold_*.json"), key=order)
        payloads = sorted(folder.glob("fold_*.joblib"), key=order)
        if not configs and not payloads:
            raise FileNotFoundError(f"{folder}: expected fold_<k>.json + .safetensors or fold_<k>.joblib "
                                    "files; found none. Point at a run directory written by heads.train or "
                                    "baselines.train.")
        _check_models(self.path, [p.stem for p in configs or payloads], self.metrics)
        if configs:
            return [_load_torch(p) for p in configs]
        return [FoldModel(p.stem, _load_joblib(p)) for p in payloads]


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

    A run left half-swapped by a killed trainer is put back first (:func:`recover_run`). The fold models are
    loaded only when asked for (:meth:`Run.fold_models`).

    Args:
        path: the run directory.

    Returns:
        The :class:`Run`.

    Raises:
        FileNotFoundError: no run directory, or ``metrics.json`` or ``predictions.csv`` missing.
        NotADirectoryError: ``path`` is a file.
        ValueError: ``metrics.json`` damaged or without ``labels``/``protocol``/``folds``, or a
            ``predictions.csv`` that does not match it (:func:`check_predictions`).
    """
    path = recover_run(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run directory; expected a run directory written by heads.train "
                                "or baselines.train (their --out). Check the path.")
    if not path.is_dir():
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


def _load_torch(path: Path) -> FoldModel:
    from safetensors.torch import load_file

    try:
        config = json.loads(path.read_text())
        weights = load_file(path.with_suffix(".safetensors"))
        missing = {"model", "model_kwargs"} - set(config)
        if missing:
            raise KeyError(f"no {sorted(missing)}")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, SafetensorError) as err:
        raise ValueError(f"{path.with_suffix('')}.{{json,safetensors}} cannot be loaded ({type(err).__name__}: "
                         f"{err}); expected a fold model written by heads.train or baselines.train. The run is "
                         "damaged: re-run the train stage.") from None
    return FoldModel(path.stem, config, weights)


def _load_joblib(path: Path) -> dict:
    try:
        payload = joblib.load(path)
    except Exception as err:  # noqa: BLE001 (unpickling a damaged file raises anything)
        raise ValueError(f"{path} cannot be loaded ({type(err).__name__}: {err}); expected a fold model written by "
                         "baselines.train. The run is damaged: re-run the train stage.") from None
    return payload


def _check_models(run_dir: Path, names: list[str], metrics: dict) -> None:
    """Refuse models that do not match ``metrics.json``: every fold it lists, ``ensemble`` members each."""
    folds = sorted(int(f["fold"]) for f in metrics["folds"])
    members = int(metrics["protocol"].get("ensemble") or 1)
    expected = sorted(f"fold_{k}" if members == 1 else f"fold_{k}_{m}" for k in folds for m in range(members))
    if sorted(names) != expected:
        missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        raise ValueError(f"{run_dir / MODELS_DIR} does not match {run_dir / 'metrics.json'} (folds {folds}, "
                         f"{members} model(s) per fold): missing {missing}, unexpected {extra}. The run is "
                         "incomplete or mixed with another: re-run the train stage.")
