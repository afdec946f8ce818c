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
import contextlib
import dataclasses
import functools
import multiprocessing
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from features.store import FeatureStore
from heads.data import NORMALISATIONS, LRUCache, Normaliser, Reader, StoreFrames, preload
from heads.fit import BALANCES, FoldData, TrainConfig, evaluate, fit, seed_everything
from heads.models import HEADS, build_head
from heads.runs import save_torch_fold
from pipeline.cli import (
    LayerList,
    UsageError,
    existing_dir,
    existing_file,
    non_negative_float,
    non_negative_int,
    output_dir,
    positive_float,
    positive_int,
    probability,
    run_main,
)
from pipeline.experiment import Experiment, load_experiment
from pipeline.labels import label_set_names
from pipeline.metrics import prediction_frame, scores, write_run
from pipeline.processes import cpu_cores, die_with_parent
from pipeline.rundir import staged_run


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_jobs(num_models: int) -> int:
    """Models trained at once by default: one per usable CPU core, at most one per model."""
    return max(1, min(num_models, cpu_cores()))


@dataclass(frozen=True)
class FoldJob:
    """Everything one fold's training needs, picklable so that a fresh process can run it.

    Attributes:
        exp: the checked experiment.
        make_reader: builds the reader (id to frames ``[L, T, H]``) inside the process that trains.
        build_model: makes a fresh model (called after seeding).
        config: optimisation settings.
        normalisation: ``global``, ``speaker`` or ``none``.
        seed: member ``m`` of fold ``k`` is seeded with ``seed + k + 1000 m`` (torch) and ``[seed, k]``, or
            ``[seed, k, m]`` for ``m > 0`` (numpy).
        out: run directory (each model is saved there).
        model_config: saved with each model (``kind, model, model_kwargs, labels, feature_settings``).
        threads: torch CPU threads of each model's training (results depend on it; not on how many run at
            once).
        members: models per fold, trained independently from different seeds; the fold's predictions are
            their mean class probabilities (1: a single model).
        memory_mb: a fold whose normalised frames fit in this many MiB holds them in memory (read once, no
            I/O during training); a larger one streams through the reader.
    """

    exp: Experiment
    make_reader: Callable[[], Reader]
    build_model: Callable[[], torch.nn.Module]
    config: TrainConfig
    normalisation: str
    seed: int
    out: str
    model_config: dict
    threads: int = 1
    members: int = 1
    memory_mb: int = 1024


def train_member(job: FoldJob, index: int, member: int = 0) -> dict:
    """Train, test and save model ``member`` of fold ``index``; return its test probabilities, history and
    figures."""
    exp, fold = job.exp, job.exp.folds[index]
    with torch_threads(job.threads):
        read, speakers = job.make_reader(), exp.frame["speaker"].to_dict()
        seed_everything(job.seed + fold.index + 1000 * member)
        rng = np.random.default_rng([job.seed, fold.index, member] if member else [job.seed, fold.index])
        normalise = Normaliser.fit(job.normalisation, read, fold.train, speakers=speakers,
                                   all_ids=fold.train + fold.val + fold.test)
        ids = fold.train + fold.val + fold.test
        frames = preload(read, ids, normalise, max_bytes=job.memory_mb * 2**20, speakers=speakers)
        data = (FoldData(read, normalise, exp.frame["label"].to_dict(), speakers) if frames is None else
                FoldData(frames.__getitem__, Normaliser("none"), exp.frame["label"].to_dict(), speakers))
        model = job.build_model()
        name = f"fold {fold.index}" + (f" member {member}" if job.members > 1 else "")
        history, best_epoch = fit(model, data, fold.train, fold.val, job.config, rng,
                                  num_classes=len(exp.labels), desc=name)
        proba, _ = evaluate(model, data, fold.test, job.config)
    save_torch_fold(job.out, fold.index, model, {**job.model_config, "normalisation": normalise.to_dict(),
                                                 "best_epoch": best_epoch, "member": member},
                    member=member if job.members > 1 else None)
    ua = scores(exp.y(fold.test), proba.argmax(axis=1))["ua"]
    print(f"{name}: best epoch {best_epoch}/{len(history)}, test ua {ua:.3f}", file=sys.stderr)
    weights = model.layer_weights.weights().detach().numpy() if hasattr(model, "layer_weights") else None
    return {"proba": proba, "history": history.assign(fold=fold.index, member=member), "weights": weights,
            "best_epoch": best_epoch, "epochs_run": len(history)}


def run_folds(job: FoldJob, *, protocol: dict, jobs: int = 1) -> dict:
    """Train every model of every fold of ``job.exp`` (``jobs`` at a time, each in a fresh process when more
    than one), then write the run directory.

    The whole run is written into a staging sibling of ``job.out`` and swapped in only when complete
    (``pipeline.rundir.staged_run``): a failure or a kill at any moment leaves the previous run as it was.

    Each model trains on ``job.threads`` torch threads whatever ``jobs`` is, so a fixed seed gives the same
    metrics on a 2-core laptop and a 64-core server.

    Args:
        job: the folds' shared settings.
        protocol: the ``protocol`` block.
        jobs: models trained at once.

    Returns:
        The metrics written.
    """
    if job.members < 1:
        raise ValueError(f"members {job.members}: expected at least 1 model per fold.")
    job.exp.warn_missing_classes()
    with staged_run(job.out) as tmp:
        return _run_folds(dataclasses.replace(job, out=str(tmp)), protocol=protocol, jobs=jobs)


def _run_folds(job: FoldJob, *, protocol: dict, jobs: int) -> dict:
    tasks = [(i, m) for i in range(len(job.exp.folds)) for m in range(job.members)]  # (fold position, member)
    args = ([job] * len(tasks), [i for i, _ in tasks], [m for _, m in tasks])
    if jobs <= 1 or len(tasks) == 1:
        results = list(map(train_member, *args))
    else:  # spawn: a forked torch (OpenMP pool, open HDF5 handles) is not safe to train in
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=die_with_parent) as pool:
            results = list(pool.map(train_member, *args))
    predictions, weights, extras = [], [], {}
    for i, fold in enumerate(job.exp.folds):
        mine = [r for (k, _), r in zip(tasks, results, strict=True) if k == i]
        proba = np.mean([r["proba"] for r in mine], axis=0)
        predictions.append(prediction_frame(fold.test, fold.index, job.exp.y(fold.test), proba, job.exp.labels))
        figures = {key: [r[key] for r in mine] for key in ("best_epoch", "epochs_run")}
        extras[fold.index] = {k: v[0] for k, v in figures.items()} if job.members == 1 else figures
        if mine[0]["weights"] is not None:
            weights.append(np.mean([r["weights"] for r in mine], axis=0).round(6).tolist())
        if job.members > 1:
            ua = scores(job.exp.y(fold.test), proba.argmax(axis=1))["ua"]
            print(f"fold {fold.index}: {job.members} members, test ua {ua:.3f}", file=sys.stderr)
    history = pd.concat([r["history"] for r in results], ignore_index=True)
    history = history[["fold", "member", "epoch", "train_loss", "val_loss", "val_acc"]]
    used = job.model_config["feature_settings"].get("used_layers", [0])
    layer_weights = {"layers": used, "folds": weights} if weights and len(used) > 1 else None
    return write_run(job.out, labels=job.exp.labels, predictions=pd.concat(predictions, ignore_index=True),
                     speakers=job.exp.frame["speaker"], protocol=protocol, history=history,
                     layer_weights=layer_weights, fold_extras=extras)


def distinct_layers(used: Sequence[int]) -> list[int]:
    """``used`` layer positions, refused when one is given twice (it would be stored and weighted twice)."""
    twice = sorted({i for i in used if list(used).count(i) > 1})
    if twice:
        raise ValueError(f"layers {list(used)}: expected each layer once, found {twice} more than once. "
                         "Drop the repeats.")
    return list(used)


def store_reader(path: str, layers: Sequence[int], cache_mb: int) -> Reader:
    """A cached reader of ``layers`` from the store at ``path`` (opened in the calling process)."""
    return LRUCache(StoreFrames(FeatureStore(path), layers), max_bytes=cache_mb * 2**20)


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
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; expected one of {NORMALISATIONS}.")
    exp = load_experiment(manifests, split, label_set, merge_calm=merge_calm, augmentation=augmentation)
    with FeatureStore(features) as store:
        exp.require_ids(store.ids(), str(features))
        used = distinct_layers(store.layer_positions(layers))
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
                    "encoder": store.attrs.get("encoder")}
    jobs = jobs or default_jobs(len(exp.folds) * members)
    job = FoldJob(exp, functools.partial(store_reader, str(features), used, max(1, cache_mb // jobs)),
                  functools.partial(build_head, head, **model_kwargs), config, normalisation, seed, out,
                  model_config, threads, members, max(1, cache_mb // jobs))
    return run_folds(job, protocol=protocol, jobs=jobs)


def apply_defaults(args: argparse.Namespace, defaults: dict) -> argparse.Namespace:
    """Fill every option left unset (``None``) from ``defaults``, then from :class:`TrainConfig`.

    The pipeline's settings of each system live in one place, params.yaml's ``systems`` and
    ``encoder_systems`` blocks, read with ``--settings``; a bare command line falls back to
    :class:`TrainConfig` and the model's own defaults."""
    fallback = {"ensemble": 1, **asdict(TrainConfig()), **defaults}
    for key, value in fallback.items():
        if getattr(args, key, "absent") is None:
            setattr(args, key, value)
    return args


def report(out: str, train: Callable[[], dict]) -> int:
    """Run a trainer for a command line and print the headline figures (exit 0); its expected failures are
    left to ``pipeline.cli.run_main`` (one ``error:`` line, exit 1)."""
    metrics = train()
    print(f"{out}: ua {metrics['ua']:.3f} ± {metrics['ua_std']:.3f}, wa {metrics['wa']:.3f}, "
          f"macro_f1 {metrics['macro_f1']:.3f}", file=sys.stderr)
    return 0


def _flag(text: str) -> bool:
    if text.lower() in {"true", "1", "yes"}:
        return True
    if text.lower() in {"false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, found {text!r}")


def check_label_set(name: str) -> None:
    """Refuse an unknown ``--label-set`` as a command-line error (exit 2) before anything is read."""
    if name not in label_set_names():
        raise UsageError(f"unknown label set {name!r}; expected one of {label_set_names()}.")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by the torch trainers (heads and the MFCC-CNN baseline)."""
    parser.add_argument("--manifest", action="append", required=True, type=existing_file,
                        help="manifest CSV; repeat to add an augmented-copies manifest")
    parser.add_argument("--split", required=True, type=existing_file)
    parser.add_argument("--label-set", required=True, help=f"one of {label_set_names()}")
    parser.add_argument("--merge-calm", type=_flag, nargs="?", const=True, default=False,
                        help="map calm onto neutral (true/false; bare flag: true)")
    parser.add_argument("--augmentation", type=_flag, default=True,
                        help="use augmented copies of the manifests (true/false, default true)")
    parser.add_argument("--out", required=True, type=output_dir, help="run directory")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--normalisation", default="global", choices=NORMALISATIONS)
    parser.add_argument("--epochs", type=positive_int, default=None)
    parser.add_argument("--patience", type=non_negative_int, default=None)
    parser.add_argument("--lr", type=positive_float, default=None)
    parser.add_argument("--weight-decay", type=non_negative_float, default=None)
    parser.add_argument("--batch-size", type=positive_int, default=None)
    parser.add_argument("--max-frames", type=non_negative_int, default=None,
                        help="random training crop / central evaluation crop in frames (0: whole utterances)")
    parser.add_argument("--balance", default=TrainConfig.balance, choices=BALANCES)
    parser.add_argument("--dropout", type=probability, default=None)
    parser.add_argument("--cache-mb", type=non_negative_int, default=2048, help="frame cache budget in MiB")
    parser.add_argument("--ensemble", type=positive_int, default=None,
                        help="models per fold from different seeds, their probabilities averaged")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads per model (the metrics depend on it, not on --jobs)")
    parser.add_argument("--jobs", type=positive_int, default=None,
                        help="models trained at once, each in its own process (default: one per CPU core)")
    parser.add_argument("--system", default=None, help="run name in comparisons")
    parser.add_argument("--settings", default=None,
                        help="YAML file whose --settings-key block gives option defaults, e.g. params.yaml")
    parser.add_argument("--settings-key", default=None,
                        help="dotted key of the block, e.g. systems.conv_egemaps.settings")


def read_settings(path: str, key: str | None) -> dict:
    """The mapping at dotted ``key`` of the YAML file ``path`` (the whole file without a key).

    Raises:
        ValueError: the key is absent or does not hold a mapping.
    """
    node = yaml.safe_load(Path(path).read_text())
    for part in key.split(".") if key else []:
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"{path}: expected a key {key!r}, found no {part!r}; check the systems blocks.")
        node = node[part]
    if not isinstance(node, dict):
        raise ValueError(f"{path}: expected {key!r} to hold option names and values, found "
                         f"{type(node).__name__}.")
    return node


def parse_with_settings(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``, taking every option that ``--settings FILE --settings-key KEY`` names as its default.

    The block's keys are option names (``weight_decay`` or ``weight-decay``); options given on the command line
    win. This is how ``dvc repro`` passes params.yaml's ``systems`` blocks, so the settings live in one place.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--settings")
    pre.add_argument("--settings-key")
    known, _ = pre.parse_known_args(argv)
    if known.settings:
        try:
            block = read_settings(known.settings, known.settings_key)
        except (OSError, ValueError) as err:
            parser.error(str(err))
        options = {opt: action for action in parser._actions for opt in action.option_strings}
        for name, value in block.items():
            action = options.get("--" + str(name).replace("_", "-"))
            if action is None or action.dest in {"settings", "settings_key", "help"}:
                parser.error(f"{known.settings}: {known.settings_key}.{name} is not an option of {parser.prog}; "
                             f"expected one of {sorted(o for o in options if o.startswith('--'))}.")
            action.required = False
            parser.set_defaults(**{action.dest: value})
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The optimisation settings of parsed options (unset ones from :class:`TrainConfig`)."""
    apply_defaults(args, {})
    return TrainConfig(epochs=args.epochs, patience=args.patience, lr=args.lr, weight_decay=args.weight_decay,
                       batch_size=args.batch_size, max_frames=args.max_frames or None, balance=args.balance)


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heads.train", description=__doc__.split("\n")[0])
    parser.add_argument("--features", required=True, type=existing_dir, help="feature store folder (the --out of features.extract or features.egemaps)")
    parser.add_argument("--head", required=True, choices=sorted(HEADS))
    parser.add_argument("--layers", action=LayerList, default=None,
                        help="positions in the store's layers, each once: 0 3 or 0,3 (default: all)")
    parser.add_argument("--hidden", type=positive_int, default=None, help="conv head width")
    parser.add_argument("--pooling", default=None, choices=["mean", "stats"],
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
    apply_defaults(args, {})
    conv_only = {"hidden": args.hidden, "pooling": args.pooling} if args.head == "conv" else {}
    head_kwargs = {"dropout": args.dropout, **conv_only}
    head_kwargs = {k: v for k, v in head_kwargs.items() if v is not None}
    return report(args.out, lambda: train_heads(
        features=args.features, manifests=args.manifest, split=args.split, head=args.head,
        label_set=args.label_set, out=args.out, merge_calm=args.merge_calm, augmentation=args.augmentation,
        normalisation=args.normalisation, layers=args.layers, config=config_from_args(args),
        head_kwargs=head_kwargs, seed=args.seed, cache_mb=args.cache_mb, system=args.system, jobs=args.jobs,
        threads=args.threads, members=args.ensemble))


if __name__ == "__main__":
    sys.exit(main())
