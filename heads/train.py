"""Stage ``heads.train``: a linear or convolutional head over frozen frame features, every fold of a split.

Usage::

    python -m heads.train --features F.h5 --manifest M [--manifest AUG] --split S --head conv|linear \\
        --label-set NAME [--seed N] --out DIR

Frames stream from the HDF5 store (an LRU cache of ``--cache-mb`` keeps small stores in memory). Per fold:
normalisation fitted on the training utterances (or per speaker, ``--normalisation speaker``, which uses the
test speakers' statistics and is labelled so), AdamW with class-balanced loss weights, early stopping on
validation loss with the best epoch restored, test predictions. Writes the run directory described in
``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch

from features.store import FeatureStore
from heads.data import NORMALISATIONS, LRUCache, Normaliser, Reader, StoreFrames
from heads.fit import BALANCES, FoldData, TrainConfig, evaluate, fit, seed_everything
from heads.models import HEADS, build_head
from heads.runs import save_torch_fold
from pipeline.experiment import Experiment, load_experiment
from pipeline.labels import label_set_names
from pipeline.metrics import prediction_frame, scores, write_run


def run_folds(exp: Experiment, *, read: Reader, build_model: Callable[[], torch.nn.Module], config: TrainConfig,
              normalisation: str, seed: int, out: str, model_config: dict, protocol: dict) -> dict:
    """Train, test and save one model per fold, then write the run directory.

    Args:
        exp: the checked experiment.
        read: id to frames ``[L, T, H]``.
        build_model: makes a fresh model (called after seeding).
        config: optimisation settings.
        normalisation: ``global``, ``speaker`` or ``none``.
        seed: fold ``k`` is seeded with ``seed + k`` (torch) and ``[seed, k]`` (numpy).
        out: run directory.
        model_config: saved with each fold (``kind, model, model_kwargs, labels, feature_settings``).
        protocol: the ``protocol`` block.

    Returns:
        The metrics written.
    """
    speakers = exp.frame["speaker"].to_dict()
    labels = exp.frame["label"].to_dict()
    predictions, history, weights, extras = [], [], [], {}
    for fold in exp.folds:
        seed_everything(seed + fold.index)
        rng = np.random.default_rng([seed, fold.index])
        normalise = Normaliser.fit(normalisation, read, fold.train, speakers=speakers,
                                   all_ids=fold.train + fold.val + fold.test)
        data = FoldData(read, normalise, labels, speakers)
        model = build_model()
        fold_history, best_epoch = fit(model, data, fold.train, fold.val, config, rng,
                                       num_classes=len(exp.labels), desc=f"fold {fold.index}")
        proba, _ = evaluate(model, data, fold.test, config)
        predictions.append(prediction_frame(fold.test, fold.index, exp.y(fold.test), proba, exp.labels))
        history.append(fold_history.assign(fold=fold.index))
        extras[fold.index] = {"best_epoch": best_epoch, "epochs_run": len(fold_history)}
        if hasattr(model, "layer_weights"):
            weights.append(model.layer_weights.weights().detach().numpy().round(6).tolist())
        save_torch_fold(out, fold.index, model, {**model_config, "normalisation": normalise.to_dict(),
                                                 "best_epoch": best_epoch})
        ua = scores(exp.y(fold.test), proba.argmax(axis=1))["ua"]
        print(f"fold {fold.index}: best epoch {best_epoch}/{len(fold_history)}, test ua {ua:.3f}", file=sys.stderr)
    history = pd.concat(history, ignore_index=True)[["fold", "epoch", "train_loss", "val_loss", "val_acc"]]
    used = model_config["feature_settings"].get("used_layers", [0])
    layer_weights = {"layers": used, "folds": weights} if weights and len(used) > 1 else None
    return write_run(out, labels=exp.labels, predictions=pd.concat(predictions, ignore_index=True),
                     speakers=exp.frame["speaker"], protocol=protocol, history=history,
                     layer_weights=layer_weights, fold_extras=extras)


def train_heads(*, features: str, manifests: Sequence[str], split: str, head: str, label_set: str, out: str,
                merge_calm: bool = False, augmentation: bool = True, normalisation: str = "global",
                layers: Sequence[int] | None = None,
                config: TrainConfig | None = None, head_kwargs: dict | None = None, seed: int = 0,
                cache_mb: int = 2048, system: str | None = None) -> dict:
    """Train ``head`` on every fold and write the run directory ``out``.

    Args:
        features: feature store (wav2vec2 hidden states or eGeMAPS low-level descriptors).
        manifests, split, label_set, merge_calm, augmentation: see ``pipeline.experiment.load_experiment``.
        head: a name in ``heads.models.HEADS``.
        out: run directory.
        normalisation: ``global`` (training utterances), ``speaker`` (each speaker's own) or ``none``.
        layers: positions in the store's layers to use (default: all).
        config: optimisation settings (default ``TrainConfig()``).
        head_kwargs: extra keyword arguments of the head (``dropout``, ``hidden``).
        seed: run seed.
        cache_mb: LRU cache of frames, in MiB.
        system: the run's name in comparisons (default ``<head>_<store kind>``).

    Returns:
        The metrics written.

    Raises:
        ValueError: unknown head, label set or normalisation; leaked speaker; features missing ids.
    """
    config = config or TrainConfig()
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {sorted(HEADS)}.")
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; expected one of {NORMALISATIONS}.")
    exp = load_experiment(manifests, split, label_set, merge_calm=merge_calm, augmentation=augmentation)
    with FeatureStore(features) as store:
        exp.require_ids(store.ids(), str(features))
        used = store.layer_positions(layers)
        input_dim = store.frames(exp.folds[0].train[0], used[0]).shape[1]
        kind = store.attrs.get("kind", "features")
        settings = {**store.attrs, "used_layers": used, "max_frames": config.max_frames,
                    "hidden_states": [store.attrs["layers"][i] for i in used]}
        model_kwargs = {"num_layers": len(used), "input_dim": input_dim, "num_classes": len(exp.labels),
                        **(head_kwargs or {})}
        model_config = {"kind": "head", "model": head, "model_kwargs": model_kwargs, "labels": exp.labels,
                        "feature_settings": settings, "train_config": asdict(config)}
        protocol = {"system": system or f"{head}_{kind}", "model": head, "feature_set": kind,
                    "features": str(features), **exp.protocol(), "normalisation": normalisation,
                    "seed": seed, "layers": used, "balance": config.balance}
        read = LRUCache(StoreFrames(store, used), max_bytes=cache_mb * 2**20)
        return run_folds(exp, read=read, build_model=lambda: build_head(head, **model_kwargs), config=config,
                         normalisation=normalisation, seed=seed, out=out, model_config=model_config,
                         protocol=protocol)


#: Defaults of the command line per (head, feature kind), equal to params.yaml's ``train.<head>_<kind>``
#: blocks, so that a bare ``python -m heads.train`` trains what ``dvc repro`` trains. eGeMAPS settings were
#: chosen on RAVDESS validation accuracy; the wav2vec2 ones are untuned (no pretrained weights on the
#: development machines). Anything not listed falls back to :class:`TrainConfig` and the head's own defaults.
RECOMMENDED: dict[tuple[str, str], dict] = {
    ("conv", "egemaps"): {"epochs": 60, "patience": 10, "lr": 1e-3, "weight_decay": 0.05, "batch_size": 32,
                          "max_frames": 300, "dropout": 0.5, "hidden": 256, "pooling": "stats"},
    ("conv", "wav2vec2"): {"epochs": 40, "patience": 5, "lr": 1e-3, "weight_decay": 0.01, "batch_size": 32,
                           "max_frames": 250, "dropout": 0.2, "hidden": 128},
    ("linear", "wav2vec2"): {"epochs": 40, "patience": 5, "lr": 1e-3, "weight_decay": 0.01, "batch_size": 32,
                             "max_frames": 250, "dropout": 0.0},
}


def apply_defaults(args: argparse.Namespace, defaults: dict) -> argparse.Namespace:
    """Fill every option left unset (``None``) from ``defaults``, then from :class:`TrainConfig`."""
    fallback = {**asdict(TrainConfig()), **defaults}
    for key, value in fallback.items():
        if getattr(args, key, "absent") is None:
            setattr(args, key, value)
    return args


def report(out: str, train: Callable[[], dict]) -> int:
    """Run a trainer for a command line: expected errors become one ``error:`` line (exit 2), success prints
    the headline figures (exit 0)."""
    try:
        metrics = train()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{out}: ua {metrics['ua']:.3f} ± {metrics['ua_std']:.3f}, wa {metrics['wa']:.3f}, "
          f"macro_f1 {metrics['macro_f1']:.3f}", file=sys.stderr)
    return 0


def _flag(text: str) -> bool:
    if text.lower() in {"true", "1", "yes"}:
        return True
    if text.lower() in {"false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, found {text!r}")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by the torch trainers (heads and the MFCC-CNN baseline)."""
    parser.add_argument("--manifest", action="append", required=True,
                        help="manifest CSV; repeat to add an augmented-copies manifest")
    parser.add_argument("--split", required=True)
    parser.add_argument("--label-set", required=True, help=f"one of {label_set_names()}")
    parser.add_argument("--merge-calm", type=_flag, nargs="?", const=True, default=False,
                        help="map calm onto neutral (true/false; bare flag: true)")
    parser.add_argument("--augmentation", type=_flag, default=True,
                        help="use augmented copies of the manifests (true/false, default true)")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--normalisation", default="global", choices=NORMALISATIONS)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-frames", type=int, default=None,
                        help="random training crop / central evaluation crop in frames (0: whole utterances)")
    parser.add_argument("--balance", default=TrainConfig.balance, choices=BALANCES)
    parser.add_argument("--dropout", type=float, default=None)
    parser.add_argument("--cache-mb", type=int, default=2048, help="frame cache budget in MiB")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--system", default=None, help="run name in comparisons")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The optimisation settings of parsed options (unset ones from :class:`TrainConfig`)."""
    apply_defaults(args, {})
    return TrainConfig(epochs=args.epochs, patience=args.patience, lr=args.lr, weight_decay=args.weight_decay,
                       batch_size=args.batch_size, max_frames=args.max_frames or None, balance=args.balance)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heads.train", description=__doc__.split("\n")[0])
    parser.add_argument("--features", required=True, help="feature store (.h5)")
    parser.add_argument("--head", required=True, choices=sorted(HEADS))
    parser.add_argument("--layers", type=int, nargs="*", default=None,
                        help="positions in the store's layers (default: all)")
    parser.add_argument("--hidden", type=int, default=None, help="conv head width")
    parser.add_argument("--pooling", default=None, choices=["mean", "stats"],
                        help="conv head: mean (Pepino et al.) or mean ‖ std over valid frames")
    add_training_args(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with FeatureStore(args.features) as store:
            kind = store.attrs.get("kind", "wav2vec2")
    except (OSError, ValueError) as err:
        print(f"error: cannot read the feature store {args.features} ({err}); expected an HDF5 store written "
              "by features.extract or features.egemaps.", file=sys.stderr)
        return 2
    apply_defaults(args, RECOMMENDED.get((args.head, kind), {}))
    conv_only = {"hidden": args.hidden, "pooling": args.pooling} if args.head == "conv" else {}
    head_kwargs = {"dropout": args.dropout, **conv_only}
    head_kwargs = {k: v for k, v in head_kwargs.items() if v is not None}
    return report(args.out, lambda: train_heads(
        features=args.features, manifests=args.manifest, split=args.split, head=args.head,
        label_set=args.label_set, out=args.out, merge_calm=args.merge_calm, augmentation=args.augmentation,
        normalisation=args.normalisation, layers=args.layers, config=config_from_args(args),
        head_kwargs=head_kwargs, seed=args.seed, cache_mb=args.cache_mb, system=args.system))


if __name__ == "__main__":
    sys.exit(main())
