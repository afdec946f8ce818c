"""Stage ``heads.train``: a linear or convolutional head over frozen frame features, every fold of a split.

Usage::

    python -m heads.train --features DIR --manifest M [--manifest AUG] --split S --head conv|linear \\
        --label-set NAME [--seed N] --out DIR

Frames stream from the HDF5 store (an LRU cache of ``--cache-mb`` keeps small stores in memory). Per fold:
normalisation fitted on the training utterances (or per speaker, ``--normalisation speaker``, which uses the
test speakers' statistics and is labelled so), AdamW with class-balanced loss weights, early stopping on
validation loss with the best epoch restored, test predictions. Writes the run directory described in
``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from dataclasses import asdict

from features.store import FeatureStore
from heads.models import HEADS, build_head
from pipeline.cli import LayerList, existing_dir, positive_int, run_main
from pipeline.experiment import load_experiment
from pipeline.normalisation import Normalisation
from training.data import store_reader
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
from training.pooling import POOLING


def train_heads(*, features: str, manifests: Sequence[str], split: str, head: str, label_set: str, out: str,
                merge_calm: bool = False, augmentation: bool = True, normalisation: str = "global",
                layers: Sequence[int] | None = None,
                config: TrainConfig | None = None, head_kwargs: dict | None = None, seed: int = 0,
                cache_mb: int = 2048, system: str | None = None, jobs: int | None = 1,
                threads: int = 1, members: int = 1) -> dict:
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
        cache_mb: LRU cache of frames, in MiB, shared out among the processes.
        system: the run's name in comparisons (default ``<head>_<store kind>``).
        jobs: models trained at once (``None``: :func:`default_jobs`); more than one trains in fresh processes.
        threads: torch threads per model; the metrics depend on it, not on ``jobs``.
        members: models per fold from different seeds, their class probabilities averaged (an ensemble).

    Returns:
        The metrics written.

    Raises:
        ValueError: unknown head, label set or normalisation; leaked speaker; features missing ids.
    """
    config = config or TrainConfig()
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {sorted(HEADS)}.")
    normalisation = Normalisation.parse(normalisation)
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
                    "seed": seed, "layers": used, "balance": config.balance, "ensemble": members,
                    "encoder": store.attrs.get("encoder"),
                    "settings": {**recorded_settings(HEADS[head], model_kwargs, config), "threads": threads}}
    jobs = jobs or default_jobs(len(exp.folds) * members)
    budget_mb = max(1, cache_mb // jobs)  # per training process
    job = FoldJob(exp, functools.partial(store_reader, str(features), used, budget_mb),
                  functools.partial(build_head, head, **model_kwargs), config, normalisation, seed, out,
                  model_config, threads, members, budget_mb)
    return run_folds(job, protocol=protocol, jobs=jobs)


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heads.train", description=__doc__.split("\n")[0])
    parser.add_argument("--features", required=True, type=existing_dir, help="feature store folder (the --out of features.extract or features.egemaps)")
    parser.add_argument("--head", required=True, choices=sorted(HEADS))
    parser.add_argument("--layers", action=LayerList, default=None,
                        help="positions in the store's layers, each once: 0 3 or 0,3 (default: all)")
    parser.add_argument("--hidden", type=positive_int, default=None, help="conv head width")
    parser.add_argument("--pooling", default=None, choices=sorted(POOLING),
                        help="conv head: mean (Pepino et al.) or mean ‖ std over valid frames")
    add_training_args(parser)
    args = parse_with_settings(parser, argv)
    check_label_set(args.label_set)
    try:
        with FeatureStore(args.features):
            pass
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the feature store {args.features} ({err}); expected a feature store "
                         "written by features.extract or features.egemaps.") from err
    apply_defaults(args)
    conv_only = {"hidden": args.hidden, "pooling": args.pooling} if args.head == "conv" else {}
    head_kwargs = {"dropout": args.dropout, **conv_only}
    head_kwargs = {k: v for k, v in head_kwargs.items() if v is not None}
    return run_trainer(args.out, lambda: train_heads(
        features=args.features, manifests=args.manifest, split=args.split, head=args.head,
        label_set=args.label_set, out=args.out, merge_calm=args.merge_calm, augmentation=args.augmentation,
        normalisation=args.normalisation, layers=args.layers, config=config_from_args(args),
        head_kwargs=head_kwargs, seed=args.seed, cache_mb=args.cache_mb, system=args.system, jobs=args.jobs,
        threads=args.threads, members=args.ensemble))


if __name__ == "__main__":
    sys.exit(main())
