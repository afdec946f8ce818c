"""Saving fold models into a run directory, and loading a whole run back for prediction.

A run directory holds ``models/fold_<k>.safetensors`` + ``models/fold_<k>.json`` per fold for torch models
(``kind`` ``head`` or ``mfcc_cnn``; ``fold_<k>_<m>`` per member ``m`` of an ensemble), or
``models/fold_<k>.joblib`` for scikit-learn baselines (``kind`` ``sklearn``). Each carries the label order, the
normalisation and the feature settings (the store's attrs plus the layers used). :func:`load_run` returns a
:class:`Run` whose ``predict_proba`` averages the class probabilities of every model.

Example:
    >>> run = load_run("data/runs/conv_egemaps")                          # doctest: +SKIP
    >>> with FeatureStore("new.h5") as store:                              # doctest: +SKIP
    ...     x = store.all_frames(uid)                                     # [L, T, H]
    >>> dict(zip(run.labels, run.predict_proba([x])[0]))                   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from heads.data import Normaliser, collate, frame_stats
from heads.models import HEADS
from pipeline.rundir import recover_run
from pipeline.runs import load_run as read_run

MODELS = "models"


def save_torch_fold(out: str | os.PathLike, fold: int, model: torch.nn.Module, config: dict,
                    member: int | None = None) -> None:
    """Write ``models/fold_<k>.safetensors`` (``fold_<k>_<m>`` for member ``m`` of an ensemble) and its JSON
    ``config`` (``kind, model, model_kwargs, labels, normalisation, feature_settings``, anything else useful
    such as ``best_epoch``)."""
    folder = Path(out) / MODELS
    folder.mkdir(parents=True, exist_ok=True)
    name = f"fold_{fold}" if member is None else f"fold_{fold}_{member}"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps({"fold": fold, **config}, indent=1) + "\n")


def save_sklearn_fold(out: str | os.PathLike, fold: int, payload: dict) -> None:
    """Write ``models/fold_<k>.joblib``: ``kind, model, estimator, labels, normalisation, feature_settings``."""
    folder = Path(out) / MODELS
    folder.mkdir(parents=True, exist_ok=True)
    joblib.dump({"fold": fold, **payload}, folder / f"fold_{fold}.joblib")


def _torch_models() -> dict[str, Callable[..., torch.nn.Module]]:
    from baselines.mfcc_cnn import MfccCnn  # imported here: baselines builds on heads

    return {**HEADS, "mfcc_cnn": MfccCnn}


def _select_layers(x: np.ndarray, settings: dict) -> np.ndarray:
    """Keep the trained layers of ``[L, ...]`` input holding either all the store's layers or just those."""
    used = settings.get("used_layers") or list(range(x.shape[0]))
    return x if x.shape[0] == len(used) else x[used]


def _prepare(kind: str, x: np.ndarray, settings: dict) -> np.ndarray:
    if kind == "mfcc_cnn":
        from baselines.mfcc_cnn import log_mel

        return log_mel(np.asarray(x, np.float32), **settings["log_mel"])
    return _select_layers(np.asarray(x, np.float32), settings)


@dataclass
class Run:
    """A trained run: every fold's model, used together.

    Attributes:
        path: the run directory.
        kind: ``head``, ``mfcc_cnn`` or ``sklearn``.
        model: ``conv``, ``linear``, ``mfcc_cnn``, ``rf`` or ``svm``.
        labels: class names, the columns of :meth:`predict_proba`.
        normalisation: ``global``, ``speaker`` or ``none``.
        feature_settings: the feature store's attrs (``layers``: hidden-state indices it held) plus
            ``used_layers`` (positions in the store's layers the model reads), ``hidden_states`` (their
            hidden-state indices) and ``max_frames`` (central crop at evaluation); mfcc_cnn: ``log_mel``.
        folds: per fold (and ensemble member), the loaded model and its config.
    """

    path: Path
    kind: str
    model: str
    labels: list[str]
    normalisation: str
    feature_settings: dict
    folds: list[tuple[object, dict]]

    def predict_proba(self, inputs: Sequence[np.ndarray], *, batch_size: int = 16) -> np.ndarray:
        """Mean class probabilities ``[N, C]`` over the fold models.

        Args:
            inputs: one array per utterance, of the kind the run was trained on:
                heads: frames ``[L, T, H]``, either every layer the store held
                (``feature_settings["layers"]``) or only those used (``feature_settings["used_layers"]``);
                sklearn: pooled features ``[L, D]`` (``FeatureStore.pooled``; eGeMAPS ``[1, 88]``);
                mfcc_cnn: mono waveforms ``[N]`` at ``feature_settings["sample_rate"]``.
                With ``speaker`` normalisation the statistics come from ``inputs`` themselves: pass the
                utterances of one speaker together.
            batch_size: utterances per forward pass.
        """
        prepared = [_prepare(self.kind, x, self.feature_settings) for x in inputs]
        if self.kind == "sklearn":
            return np.mean([self._sklearn_proba(est, cfg, prepared) for est, cfg in self.folds], axis=0)
        return np.mean([self._torch_proba(m, cfg, prepared, batch_size) for m, cfg in self.folds], axis=0)

    def _sklearn_proba(self, estimator, cfg: dict, prepared: list[np.ndarray]) -> np.ndarray:
        from baselines.models import speaker_standardise

        X = np.stack([x.reshape(-1) for x in prepared])
        proba = np.zeros((len(X), len(self.labels)))
        proba[:, cfg["classes"]] = estimator.predict_proba(
            speaker_standardise(X) if self.normalisation == "speaker" else X)
        return proba

    @torch.no_grad()
    def _torch_proba(self, model, cfg: dict, prepared: list[np.ndarray], batch_size: int) -> np.ndarray:
        if self.normalisation == "speaker":
            normalise = Normaliser("global", {"": frame_stats(lambda i: prepared[i], range(len(prepared)))})
        else:
            normalise = Normaliser.from_dict(cfg["normalisation"])
        max_frames = self.feature_settings.get("max_frames")
        out = []
        for start in range(0, len(prepared), batch_size):
            chunk = []
            for x in prepared[start:start + batch_size]:
                if max_frames and x.shape[1] > max_frames:
                    offset = (x.shape[1] - max_frames) // 2
                    x = x[:, offset:offset + max_frames]
                chunk.append(normalise(x))
            out.append(torch.softmax(model(*collate(chunk)), dim=-1).numpy())
        return np.concatenate(out)


def _load_torch(path: Path, builders: dict) -> tuple[object, dict]:
    try:
        cfg = json.loads(path.read_text())
        model = builders[cfg["model"]](**cfg["model_kwargs"])
        model.load_state_dict(load_file(path.with_suffix(".safetensors")))
    except (OSError, json.JSONDecodeError, KeyError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"{path.with_suffix('')}.{{json,safetensors}} cannot be loaded ({type(err).__name__}: "
                         f"{err}); expected a fold model written by heads.train or baselines.train. The run is "
                         "damaged: re-run the train stage.") from None
    return model.eval(), cfg


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
        raise ValueError(f"{run_dir / MODELS} does not match {run_dir / 'metrics.json'} (folds {folds}, "
                         f"{members} model(s) per fold): missing {missing}, unexpected {extra}. The run is "
                         "incomplete or mixed with another: re-run the train stage.")


def load_run(run_dir: str | os.PathLike) -> Run:
    """Load every fold model of a run directory written by ``heads.train`` or ``baselines.train``.

    The run is read and checked first (``pipeline.runs.load_run``: ``metrics.json`` against
    ``predictions.csv``), then its models against ``metrics.json``: one per fold (``ensemble`` per fold for
    torch ensembles), none missing and none left over, so a run never predicts from part of its folds.

    Raises:
        FileNotFoundError: no run directory, or no ``metrics.json``/``predictions.csv``.
        NotADirectoryError: ``run_dir`` is a file.
        ValueError: an inconsistent or damaged run, or models that do not match ``metrics.json``.
    """
    if not Path(run_dir).exists() and not recover_run(run_dir).exists():
        raise FileNotFoundError(f"{run_dir}: no such run directory; expected the --out of heads.train or "
                                "baselines.train. Check the path.")
    metrics = read_run(run_dir).metrics
    folder = Path(run_dir) / MODELS
    order = lambda p: [int(n) for n in p.stem.split("_")[1:]]  # noqa: E731 (fold, then member)
    configs = sorted(folder.glob("fold_*.json"), key=order)
    payloads = sorted(folder.glob("fold_*.joblib"), key=order)
    if not configs and not payloads:
        raise FileNotFoundError(f"{folder}: expected fold_<k>.json + .safetensors or fold_<k>.joblib "
                                "files; found none. Point at a run directory written by heads.train or "
                                "baselines.train.")
    _check_models(Path(run_dir), [p.stem for p in configs or payloads], metrics)
    if configs:
        builders = _torch_models()
        folds = [_load_torch(p, builders) for p in configs]
    else:
        folds = [(p["estimator"], p) for p in map(_load_joblib, payloads)]
    first = folds[0][1]
    return Run(Path(run_dir), first["kind"], first["model"], list(first["labels"]),
               first["normalisation"]["mode"], first["feature_settings"], folds)
