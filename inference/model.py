"""A trained run's fold models, used together on new inputs.

A run directory (``training.rundir``) stores each fold's model as the trainer saved it; :class:`Predictor`
builds them again (torch models through :data:`MODEL_BUILDERS`, the explicit registry of every model a
trainer saves) and averages the class probabilities of every fold (and ensemble member).

Example:
    >>> predictor = Predictor.from_run(load_run("data/runs/conv_egemaps"))     # doctest: +SKIP
    >>> with FeatureStore("data/features/egemaps") as store:                    # doctest: +SKIP
    ...     x = store.all_frames(uid)                                          # [L, T, H]
    >>> dict(zip(predictor.labels, predictor.predict_proba([x])[0]))            # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from baselines.mfcc_cnn import MfccCnn, log_mel
from heads.models import HEADS
from pipeline.normalisation import Normalisation, Normaliser, frame_stats, speaker_standardise
from training.data import batches
from training.rundir import FoldModel, Run

#: Torch model name (``model`` in a fold's config) to the class that rebuilds it from ``model_kwargs``.
MODEL_BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {**HEADS, "mfcc_cnn": MfccCnn}


def _select_layers(x: np.ndarray, settings: dict, all_layers: bool | None = None) -> np.ndarray:
    """The trained layers, in training order, of ``[L, ...]`` input holding every layer the store held, in its
    order (``all_layers`` True), or only the used ones, in training order (False); None tells them apart by
    ``L`` where it can.

    Raises:
        ValueError: ``L`` fits neither, or both while the used layers reorder every stored one (``--layers 1 0``
            on a store of two: say which with ``all_layers``).
    """
    used = settings.get("used_layers") or list(range(x.shape[0]))
    stored = len(settings.get("layers") or used)
    if all_layers is None:
        if x.shape[0] == len(used) == stored and used != list(range(stored)):
            raise ValueError(f"input of {x.shape[0]} layers: expected either the store's {stored} layers in its "
                             f"order or the {len(used)} used ones in training order {used}, which here are the "
                             "same count; pass all_layers=True (the store's order) or False (training order).")
        all_layers = x.shape[0] != len(used)
    expected = stored if all_layers else len(used)
    if x.shape[0] != expected:
        raise ValueError(f"input of {x.shape[0]} layers: expected {expected} ("
                         f"{'every layer the store held' if all_layers else f'the used layers {used}'}); pass the "
                         "features the run was trained on.")
    return x[used] if all_layers else x


def _build(fold: FoldModel) -> tuple[object, dict]:
    if fold.state_dict is None:
        return fold.estimator, fold.config
    name = fold.config["model"]
    if name not in MODEL_BUILDERS:
        raise ValueError(f"fold model {fold.name}: unknown model {name!r}; expected one of "
                         f"{sorted(MODEL_BUILDERS)}. The run was written by another version: re-run the train "
                         "stage.")
    try:
        model = MODEL_BUILDERS[name](**fold.config["model_kwargs"])
        model.load_state_dict(fold.state_dict)
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"fold model {fold.name} cannot be rebuilt ({type(err).__name__}: {err}); expected "
                         "weights matching its model_kwargs. The run is damaged: re-run the train stage.") from None
    return model.eval(), fold.config


@dataclass
class Predictor:
    """Every fold model of a run, used together.

    Attributes:
        run: the run directory, read.
        kind: ``head``, ``mfcc_cnn`` or ``sklearn``.
        model: ``conv``, ``linear``, ``mfcc_cnn``, ``rf``, ``svm`` or ``logreg``.
        labels: class names, the columns of :meth:`predict_proba`.
        normalisation: a :class:`pipeline.normalisation.Normalisation`.
        feature_settings: the feature store's attrs (``layers``: hidden-state indices it held) plus
            ``used_layers`` (positions in the store's layers the model reads), ``hidden_states`` (their
            hidden-state indices) and ``max_frames`` (central crop at evaluation); mfcc_cnn: ``log_mel``.
        folds: per fold (and ensemble member), the built model and its config.
    """

    run: Run
    kind: str
    model: str
    labels: list[str]
    normalisation: str
    feature_settings: dict
    folds: list[tuple[object, dict]]

    @classmethod
    def from_run(cls, run: Run) -> Predictor:
        """Build every fold model of ``run`` (checked against its ``metrics.json``).

        Raises:
            FileNotFoundError: the run has no fold models.
            ValueError: models that do not match ``metrics.json``, or that cannot be rebuilt.
        """
        folds = [_build(fold) for fold in run.fold_models()]
        first = folds[0][1]
        return cls(run, first["kind"], first["model"], list(first["labels"]),
                   Normalisation(first["normalisation"]["mode"]), first["feature_settings"], folds)

    @property
    def path(self) -> Path:
        """The run directory."""
        return self.run.path

    def predict_proba(self, inputs: Sequence[np.ndarray], *, batch_size: int = 16,
                      all_layers: bool | None = None) -> np.ndarray:
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
            all_layers: whether ``inputs`` hold every layer the store held (True) or only the used ones, in
                training order (False); None: told apart by their count, refused where that cannot tell.
        """
        prepared = [self._prepare(x, all_layers) for x in inputs]
        if self.kind == "sklearn":
            return np.mean([self._sklearn_proba(est, cfg, prepared) for est, cfg in self.folds], axis=0)
        return np.mean([self._torch_proba(m, cfg, prepared, batch_size) for m, cfg in self.folds], axis=0)

    def _prepare(self, x: np.ndarray, all_layers: bool | None) -> np.ndarray:
        if self.kind == "mfcc_cnn":
            return log_mel(np.asarray(x, np.float32), **self.feature_settings["log_mel"])
        return _select_layers(np.asarray(x, np.float32), self.feature_settings, all_layers)

    def _sklearn_proba(self, estimator, cfg: dict, prepared: list[np.ndarray]) -> np.ndarray:
        X = np.stack([x.reshape(-1) for x in prepared])
        proba = np.zeros((len(X), len(self.labels)))
        proba[:, cfg["classes"]] = estimator.predict_proba(
            speaker_standardise(X) if self.normalisation == Normalisation.SPEAKER else X)
        return proba

    @torch.no_grad()
    def _torch_proba(self, model, cfg: dict, prepared: list[np.ndarray], batch_size: int) -> np.ndarray:
        ids = range(len(prepared))
        if self.normalisation == Normalisation.SPEAKER:
            normalise = Normaliser(Normalisation.GLOBAL, {"": frame_stats(prepared.__getitem__, ids)})
        else:
            normalise = Normaliser.from_dict(cfg["normalisation"])
        labels = np.zeros(len(prepared), dtype=np.int64)  # unused: batches as training evaluates them (centred crops)
        return np.concatenate([torch.softmax(model(x, lengths), dim=-1).numpy()
                               for x, lengths, _ in batches(ids, labels, prepared.__getitem__, normalise,
                                                            batch_size=batch_size,
                                                            max_frames=self.feature_settings.get("max_frames"))])
