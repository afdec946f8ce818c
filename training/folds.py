"""Training every fold of an experiment: one model per fold (or an ensemble), in parallel processes, into one run.

Shared by ``heads.train`` and the MFCC-CNN of ``baselines.train``. :class:`FoldJob` holds everything a fold's
training needs and is picklable, so each model can train in a fresh process; :func:`run_folds` trains them all
and writes the run directory (``training.rundir``) only when every model is done. Each model trains on a fixed
number of torch threads, so a fixed seed gives the same figures on any number of cores.

Example:
    >>> job = FoldJob(exp, make_reader, build_model, TrainConfig(), "global", 0, "data/runs/x", model_config)
    >>> metrics = run_folds(job, protocol=protocol, jobs=2)                         # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pipeline.experiment import Experiment
from pipeline.metrics import scores
from pipeline.normalisation import Normalisation, Normaliser, Reader
from pipeline.processes import cpu_cores, worker_pool
from training.data import preload
from training.fit import FoldData, TrainConfig, evaluate, fit, seed_everything
from training.rundir import prediction_frame, save_torch_fold, staged_run, write_run


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
        ids, labels = fold.train + fold.val + fold.test, exp.frame["label"].to_dict()
        normalise = Normaliser.fit(job.normalisation, read, fold.train, speakers=speakers, all_ids=ids)
        frames = preload(read, ids, normalise, max_bytes=job.memory_mb * 2**20, speakers=speakers)
        if frames is None:
            data = FoldData(read, normalise, labels, speakers)
        else:  # normalised in memory: the reader, and the raw frames its cache holds, are let go
            read = None
            data = FoldData(frames.__getitem__, Normaliser(Normalisation.NONE), labels, speakers)
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
    (``training.rundir.staged_run``): a failure or a kill at any moment leaves the previous run as it was.

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
        with worker_pool(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
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
