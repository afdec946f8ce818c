"""Stage ``baselines.train``: RandomForest / SVM on utterance-level features, or the MFCC-CNN, every fold.

Usage::

    python -m baselines.train --features DIR --manifest M --split S --model rf|svm --label-set NAME --out DIR
    python -m baselines.train --manifest M --split S --model mfcc_cnn --label-set NAME --out DIR

``rf`` and ``svm`` read ``FeatureStore.pooled`` (eGeMAPS: the 88 functionals; wav2vec2: mean ‖ std of the
chosen layers) and fit on the training and validation utterances of each fold (nothing is tuned on
validation). ``mfcc_cnn`` computes log-mel frames from the audio itself and trains with the training core's loop
(early stopping on validation). Writes the run directory described in ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd

from baselines.mfcc_cnn import AudioFrames, MfccCnn
from baselines.models import ESTIMATORS, build_model
from features.store import FeatureStore
from pipeline.cli import LayerList, UsageError, existing_dir, positive_float, positive_int, run_main
from pipeline.experiment import load_experiment
from pipeline.metrics import scores
from pipeline.normalisation import Normalisation, speaker_standardise
from training.data import LRUCache
from training.fit import TrainConfig, recorded_settings
from training.folds import FoldJob, default_jobs, run_folds
from training.options import (
    add_training_args,
    apply_defaults,
    check_label_set,
    config_from_args,
    parse_with_settings,
    run_trainer,
)
from training.rundir import prediction_frame, save_sklearn_fold, staged_run, write_run

#: Normalisations the scikit-learn baselines accept (their pipelines standardise anyway; ``none`` is not one).
SKLEARN_NORMALISATIONS = (Normalisation.GLOBAL, Normalisation.SPEAKER)


def train_sklearn(*, features: str, manifests: Sequence[str], split: str, model: str, label_set: str, out: str,
                  merge_calm: bool = False, augmentation: bool = True, normalisation: str = "global",
                  layers: Sequence[int] | None = None,
                  seed: int = 0, settings: dict | None = None, system: str | None = None,
                  extra_protocol: dict | None = None) -> dict:
    """Fit ``model`` (``rf`` or ``svm``) on every fold's training + validation utterances; write ``out``.

    Args:
        features: feature store; its ``pooled`` features of ``layers`` (default all), flattened, are used.
        manifests, split, label_set, merge_calm, augmentation: see ``pipeline.experiment.load_experiment``.
        normalisation: ``global`` (the pipeline's scaler, fitted on training rows) or ``speaker`` (each
            speaker z-scored with its own statistics first, test speakers included).
        seed: the estimator's ``random_state``.
        settings: estimator settings (``n_estimators``, ``C``, ...).
        extra_protocol: entries added to the run's ``protocol`` (the per-layer probe's ``probe_layer``).

    Raises:
        ValueError: unknown model, label set or normalisation; leaked speaker; features missing ids.
    """
    if model not in ESTIMATORS:
        raise ValueError(f"unknown baseline {model!r}; expected one of {sorted(ESTIMATORS)} or 'mfcc_cnn'.")
    normalisation = Normalisation.parse(normalisation, SKLEARN_NORMALISATIONS)
    exp = load_experiment(manifests, split, label_set, merge_calm=merge_calm, augmentation=augmentation)
    with FeatureStore(features) as store:
        exp.require_ids(store.ids(), str(features))
        used = store.layer_positions(layers)
        ids = exp.needed_ids()
        X = np.stack([store.pooled(uid)[used].reshape(-1) for uid in ids])
        attrs = dict(store.attrs)
    bad = [uid for uid, finite in zip(ids, np.isfinite(X).all(axis=1), strict=True) if not finite]
    if bad:
        raise ValueError(f"{features}: {len(bad)} utterances have NaN or infinite features, e.g. {bad[:5]}; "
                         "expected finite values (the store is corrupt). Delete those entries (or the store) and "
                         "extract again.")
    exp.warn_missing_classes(("train", "val"))
    if normalisation == Normalisation.SPEAKER:
        X = speaker_standardise(X, exp.speakers(ids))
    row = {uid: i for i, uid in enumerate(ids)}
    kind = attrs.get("kind", "features")
    feature_settings = {**attrs, "used_layers": used, "hidden_states": [attrs["layers"][i] for i in used]}
    with staged_run(out) as tmp:  # the previous run stays whole until this one is complete
        predictions, extras = [], {}
        for fold in exp.folds:
            fit_ids = fold.train + fold.val
            estimator = build_model(model, seed=seed, **(settings or {}))
            estimator.fit(X[[row[i] for i in fit_ids]], exp.y(fit_ids))
            proba = np.zeros((len(fold.test), len(exp.labels)))
            proba[:, estimator.classes_] = estimator.predict_proba(X[[row[i] for i in fold.test]])
            predictions.append(prediction_frame(fold.test, fold.index, exp.y(fold.test), proba, exp.labels))
            extras[fold.index] = {"n_fit": len(fit_ids)}
            save_sklearn_fold(tmp, fold.index, {
                "kind": "sklearn", "model": model, "estimator": estimator, "labels": exp.labels,
                "classes": estimator.classes_.tolist(), "normalisation": {"mode": normalisation},
                "feature_settings": feature_settings, "settings": settings or {}})
            ua = scores(exp.y(fold.test), proba.argmax(1))["ua"]
            print(f"fold {fold.index}: test ua {ua:.3f}", file=sys.stderr)
        protocol = {"system": system or f"{model}_{kind}", "model": model, "feature_set": kind,
                    "features": str(features), **exp.protocol(), "normalisation": normalisation, "seed": seed,
                    "layers": used, "fit_on": "train+val", "settings": settings or {},
                    "encoder": attrs.get("encoder"), **(extra_protocol or {})}
        return write_run(tmp, labels=exp.labels, predictions=pd.concat(predictions, ignore_index=True),
                         speakers=exp.frame["speaker"], protocol=protocol, fold_extras=extras)


def train_mfcc_cnn(*, manifests: Sequence[str], split: str, label_set: str, out: str, merge_calm: bool = False,
                   augmentation: bool = True, normalisation: str = "global", config: TrainConfig | None = None,
                   log_mel_settings: dict | None = None, model_kwargs: dict | None = None, seed: int = 0,
                   cache_mb: int = 2048, system: str | None = None, jobs: int | None = 1,
                   threads: int = 1, members: int = 1) -> dict:
    """Train the MFCC-CNN on every fold from the manifests' audio; write ``out``.

    Args:
        log_mel_settings: ``baselines.mfcc_cnn.log_mel`` keywords (``n_mels``, ``n_mfcc``, ``hop_ms``, ...).
        model_kwargs: ``MfccCnn`` keywords (``channels``, ``dropout``).
        Others: as ``heads.train.train_heads``.
    """
    config = config or TrainConfig()
    exp = load_experiment(manifests, split, label_set, merge_calm=merge_calm, augmentation=augmentation)
    settings = {"sample_rate": 16000, "n_mels": 64, **(log_mel_settings or {})}
    jobs = jobs or default_jobs(len(exp.folds) * members)
    budget_mb = max(1, cache_mb // jobs)  # per training process
    read = functools.partial(LRUCache, AudioFrames(exp.frame["path"].to_dict(), settings),
                             max_bytes=budget_mb * 2**20)
    input_dim = settings.get("n_mfcc") or settings["n_mels"]
    kwargs = {"num_layers": 1, "input_dim": input_dim, "num_classes": len(exp.labels), **(model_kwargs or {})}
    feature_set = "mfcc" if settings.get("n_mfcc") else "logmel"
    feature_settings = {"kind": feature_set, "sample_rate": settings["sample_rate"], "log_mel": settings,
                        "layers": [0], "used_layers": [0], "max_frames": config.max_frames}
    model_config = {"kind": "mfcc_cnn", "model": "mfcc_cnn", "model_kwargs": kwargs, "labels": exp.labels,
                    "feature_settings": feature_settings}
    protocol = {"system": system or f"mfcc_cnn_{feature_set}", "model": "mfcc_cnn", "feature_set": feature_set,
                "features": "audio", **exp.protocol(), "normalisation": normalisation, "seed": seed,
                "layers": [0], "balance": config.balance, "ensemble": members,
                "settings": {**recorded_settings(MfccCnn, kwargs, config), "log_mel": settings, "threads": threads}}
    job = FoldJob(exp, read, functools.partial(MfccCnn, **kwargs), config,
                  normalisation, seed, out, model_config, threads, members, budget_mb)
    return run_folds(job, protocol=protocol, jobs=jobs)


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m baselines.train", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, choices=[*sorted(ESTIMATORS), "mfcc_cnn"])
    parser.add_argument("--features", default=None, type=existing_dir,
                        help="feature store folder; rf and svm only")
    parser.add_argument("--layers", action=LayerList, default=None,
                        help="rf/svm: positions in the store's layers, each once: 0 3 or 0,3 (default: all)")
    parser.add_argument("--n-estimators", type=positive_int, default=500, help="rf")
    parser.add_argument("--C", type=positive_float, default=10.0, help="svm")
    parser.add_argument("--n-jobs", type=int, default=1, help="rf (-1: every core)")
    parser.add_argument("--n-mels", type=positive_int, default=64, help="mfcc_cnn")
    parser.add_argument("--n-mfcc", type=positive_int, default=None, help="mfcc_cnn: MFCCs instead of log-mel")
    add_training_args(parser)
    args = apply_defaults(parse_with_settings(parser, argv))
    check_label_set(args.label_set)
    if args.n_jobs == 0 or args.n_jobs < -1:
        raise UsageError(f"--n-jobs {args.n_jobs}: expected a whole number of at least 1, or -1 for every core.")
    if args.n_mfcc and args.n_mfcc > args.n_mels:
        raise UsageError(f"--n-mfcc {args.n_mfcc}: expected at most --n-mels ({args.n_mels}) coefficients.")
    common = {"manifests": args.manifest, "split": args.split, "label_set": args.label_set, "out": args.out,
              "merge_calm": args.merge_calm, "augmentation": args.augmentation,
              "normalisation": args.normalisation, "seed": args.seed,
              "system": args.system}
    def train() -> dict:
        if args.model == "mfcc_cnn":
            model_kwargs = {} if args.dropout is None else {"dropout": args.dropout}
            return train_mfcc_cnn(**common, config=config_from_args(args), model_kwargs=model_kwargs,
                                  log_mel_settings={"n_mels": args.n_mels, "n_mfcc": args.n_mfcc},
                                  cache_mb=args.cache_mb, jobs=args.jobs, threads=args.threads,
                                  members=args.ensemble)
        if not args.features:
            raise UsageError(f"--model {args.model} reads utterance-level features; expected --features "
                             "DIR, found none. Pass the eGeMAPS (or wav2vec2) feature store.")
        settings = ({"n_estimators": args.n_estimators, "n_jobs": args.n_jobs} if args.model == "rf"
                    else {"C": args.C})
        return train_sklearn(**common, features=args.features, model=args.model, layers=args.layers,
                             settings=settings)

    return run_trainer(args.out, train)


if __name__ == "__main__":
    sys.exit(main())
