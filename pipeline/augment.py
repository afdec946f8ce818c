"""Augment stage: seeded audiomentations copies of training utterances, optionally class-balanced.

Only utterances in a ``train`` partition of some fold are copied. Each copy is seeded by
``(seed, source id, copy index)``, so the files are byte-identical on every rerun whatever the worker
count. Training places a copy with ``pipeline.experiment.place_augmented``, only in folds where its source is in training.
``--balance`` equalises the classes over the pooled training utterances: exactly for a single split,
approximately within each fold of a k-fold split (a copy is made once, not per fold).

Example (the chain is params.yaml's ``augment.chain`` unless ``--chain FILE [--chain-key KEY]`` names another):
    python -m pipeline.augment --manifest data/manifest.csv --split data/splits.csv --out data/augmented \\
        --copies 1
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import multiprocessing
import os
import random
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.signal
import yaml
from audiomentations import AddColorNoise, AddGaussianSNR, Gain, PitchShift, TimeStretch
from audiomentations.core.transforms_interface import BaseWaveformTransform
from tqdm import tqdm

from pipeline.audio import SAMPLE_RATE, AudioError, load_audio, write_audio
from pipeline.cli import boolean, existing_file, non_negative_int, output_dir, positive_int, run_main
from pipeline.labels import select_labels
from pipeline.outputs import check_replaceable, refuse_inputs_inside, replaced_whole
from pipeline.processes import worker_pool
from pipeline.roots import read_manifests, resolve_paths
from pipeline.split import read_split

EXTRA_COLUMNS = ["source_id", "augmentation"]


class SyntheticReverb(BaseWaveformTransform):
    """Reverb by convolution with exponentially decaying noise (decays 60 dB over ``rt60`` seconds).

    audiomentations' ``RoomSimulator`` needs pyroomacoustics and ``ApplyImpulseResponse`` needs IR files;
    this statistical room model needs neither. The wet signal is scaled to the dry signal's RMS.
    """

    def __init__(self, min_rt60: float = 0.2, max_rt60: float = 0.6, min_wet: float = 0.2,
                 max_wet: float = 0.5, p: float = 0.5):
        super().__init__(p)
        if min_rt60 <= 0 or not 0 <= min_wet <= max_wet <= 1:
            raise ValueError(f"expected 0 < rt60 and 0 <= wet <= 1, found rt60 from {min_rt60} s, wet "
                             f"{min_wet} to {max_wet}")
        self.min_rt60, self.max_rt60, self.min_wet, self.max_wet = min_rt60, max_rt60, min_wet, max_wet

    def randomize_parameters(self, samples: np.ndarray, sample_rate: int):
        super().randomize_parameters(samples, sample_rate)
        if self.parameters["should_apply"]:
            self.parameters["rt60"] = random.uniform(self.min_rt60, self.max_rt60)
            self.parameters["wet"] = random.uniform(self.min_wet, self.max_wet)

    def apply(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        rt60, wet = self.parameters["rt60"], self.parameters["wet"]
        t = np.arange(max(1, int(rt60 * sample_rate))) / sample_rate
        ir = np.random.standard_normal(len(t))  # noqa: NPY002 (audiomentations' global state)
        ir = ir * np.exp(-np.log(1000.0) * t / rt60)
        reverberant = scipy.signal.fftconvolve(samples, ir)[: len(samples)]
        scale = np.sqrt(np.mean(samples**2) / max(np.mean(reverberant**2), 1e-12))
        return ((1 - wet) * samples + wet * scale * reverberant).astype(np.float32)


#: Transforms a chain may name, in params order. Time stretch uses ``signalsmith_stretch`` (no numba JIT to
#: compile, unlike librosa's phase vocoder) and keeps the new length.
TRANSFORMS: dict[str, type | partial] = {
    "gaussian_noise": AddGaussianSNR,
    "color_noise": AddColorNoise,
    "time_stretch": partial(TimeStretch, method="signalsmith_stretch", leave_length_unchanged=False),
    "pitch_shift": partial(PitchShift, method="signalsmith_stretch"),
    "gain": Gain,
    "reverb": SyntheticReverb,
}


def build_chain(chain: Mapping[str, Mapping]) -> list[tuple[str, BaseWaveformTransform]]:
    """Check a chain ``{transform name: {p, min_*/max_* ...}}`` and build its transforms, in order.

    Raises:
        ValueError: not a mapping, unknown transform or parameter, ``p`` outside [0, 1], or an inverted range.
    """
    if not isinstance(chain, Mapping):
        raise ValueError(f"expected the augmentation chain as a mapping {{transform: {{param: value}}}}, "
                         f"found {type(chain).__name__}; see the augment block of params.yaml.")
    built = []
    for name, params in chain.items():
        if name not in TRANSFORMS:
            raise ValueError(f"unknown transform {name!r} in the augmentation chain; expected one of "
                             f"{sorted(TRANSFORMS)}. Fix the augment chain in params.yaml.")
        params = dict(params or {})
        signature = inspect.signature(TRANSFORMS[name])
        accepted = {k: v.default for k, v in signature.parameters.items() if k != "self"}
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ValueError(f"{name}: unknown parameter(s) {unknown}; expected some of {sorted(accepted)}.")
        merged = {**accepted, **params}
        if not 0.0 <= float(merged["p"]) <= 1.0:
            raise ValueError(f"{name}: p={merged['p']} is not a probability; expected 0 <= p <= 1.")
        for key in (k for k in merged if k.startswith("min_") and "max_" + k[4:] in merged):
            low, high = merged[key], merged["max_" + key[4:]]
            if low > high:
                raise ValueError(f"{name}: inverted range, {key}={low} > max_{key[4:]}={high}; expected "
                                 f"{key} <= max_{key[4:]}. Swap the two values.")
        try:
            built.append((name, TRANSFORMS[name](**params)))
        except (AssertionError, TypeError, ValueError) as err:
            raise ValueError(f"{name}: audiomentations refuses {params} ({err or 'assertion failed'}); "
                             "expected values within the transform's documented ranges.") from err
    return built


def copy_seed(seed: int, source_id: str, index: int) -> int:
    """A 32-bit seed for one copy, stable across processes and Python versions (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{source_id}|{index}".encode()).digest()[:4], "little")


def _describe(name: str, transform: BaseWaveformTransform, before: np.ndarray, after: np.ndarray) -> str:
    """``name(param=value, ...)`` with what the transform drew (SNR measured for noise, gain in dB)."""
    drawn = {k: v for k, v in transform.parameters.items() if k != "should_apply" and not isinstance(v, bool)}
    if name.endswith("_noise"):
        noise = np.mean((after - before) ** 2)
        drawn = {"snr_db": 10 * np.log10(np.mean(before**2) / max(noise, 1e-20)),
                 **{k: v for k, v in drawn.items() if k not in ("noise_std", "desired_noise_rms")}}
    if "amplitude_ratio" in drawn:
        drawn = {"gain_db": 20 * np.log10(drawn.pop("amplitude_ratio"))}
    return f"{name}(" + ", ".join(f"{k}={float(v):.4g}" for k, v in drawn.items()) + ")"


def augment_one(x: np.ndarray, chain: list[tuple[str, BaseWaveformTransform]], *, seed: int,
                sample_rate: int = SAMPLE_RATE, max_draws: int = 100) -> tuple[np.ndarray, str]:
    """Apply ``chain`` to ``x`` with its randomness seeded by ``seed``; a draw where nothing applies is redrawn.

    Returns:
        ``(y [N'], description)``; ``y`` is peak-limited to 0.999 when the chain pushed it past full scale.
    """
    random.seed(seed)  # audiomentations draws from the global ``random`` and ``np.random`` states
    np.random.seed(seed)  # noqa: NPY002
    for _ in range(max_draws):
        y, steps = x, []
        for name, transform in chain:
            before, y = y, transform(y, sample_rate)
            if transform.parameters["should_apply"]:
                steps.append(_describe(name, transform, before, y))
        if steps:
            break
    peak = float(np.max(np.abs(y))) if len(y) else 0.0
    if peak > 0.999:
        y = y * (0.999 / peak)
        steps.append(f"limit(gain_db={20 * np.log10(0.999 / peak):.4g})")
    return y.astype(np.float32), "; ".join(steps) or "none"


def _augment_source(task: tuple) -> tuple[list[tuple[str, str, int]], tuple[str, str] | None]:
    """Worker: load one source and write its copies: ``([(copy id, description, frames)], None)``, or
    ``([], (reason, message))`` when the source cannot be read."""
    path, source_id, indices, chain, seed, out_dir = task
    try:
        x = load_audio(path, sample_rate=SAMPLE_RATE)
    except AudioError as err:
        return [], (err.reason, str(err))
    except OSError as err:  # gone since the manifest was made (a disk not mounted, a file moved): counted, reported
        return [], ("missing" if isinstance(err, FileNotFoundError) else "unreadable",
                    f"{path}: {err}; expected the audio the manifest lists. Rebuild the manifest or restore the file.")
    transforms, results = build_chain(chain), []
    for k in indices:
        y, description = augment_one(x, transforms, seed=copy_seed(seed, source_id, k))
        copy_id = f"{source_id}_aug{k}"
        write_audio(Path(out_dir) / f"{copy_id}.flac", y, SAMPLE_RATE)
        results.append((copy_id, description, len(y)))
    return results, None


def plan_copies(classes: pd.Series, *, copies: int, balance: bool, seed: int) -> pd.Series:
    """Copies per source.

    Args:
        classes: each source's class, indexed by source id.
        copies: copies per source.
        balance: instead, give each class enough copies that it ends with ``max class size x (1 + copies)``
            utterances; a class's remainder goes to seeded picks among its sources.
        seed: seeds those picks.

    Returns:
        ``pd.Series`` of copy counts indexed by source id (sorted).
    """
    classes = classes.sort_index()
    if not balance:
        return pd.Series(copies, index=classes.index, dtype=int)
    target = classes.value_counts().max() * (1 + copies)
    plan = pd.Series(0, index=classes.index, dtype=int)
    for i, label in enumerate(sorted(classes.unique())):
        ids = classes.index[classes == label]
        per, rest = divmod(target - len(ids), len(ids))
        bonus = np.random.default_rng([seed, i]).permutation(len(ids)) < rest
        plan[ids] = per + bonus.astype(int)
    return plan


@contextmanager
def _mapper(workers: int):
    """An ordered ``map``: in this process for one worker, else over a process pool."""
    if workers <= 1:
        yield map
        return
    with worker_pool(workers, mp_context=multiprocessing.get_context()) as executor:
        yield partial(executor.map, chunksize=4)


def _carried(entry: Path) -> bool:
    """What a new output keeps of the old one: a file of its own (notes, a ``.gitignore``), not this stage's
    (copies, their folders, the manifest, the rejects)."""
    return entry.is_file() and entry.suffix != ".flac" and entry.name not in {"manifest.csv", "rejects.csv"}


def _own_folder(out_dir: str | os.PathLike, sources: pd.Series) -> Path:
    """``out_dir``, checked before any work to be a folder the stage may replace whole: new, empty, or an earlier
    output of this stage (its ``manifest.csv`` with ``source_id`` and ``augmentation``, folders of ``.flac``
    copies), and holding none of the source audio.

    Raises:
        ValueError: ``out_dir`` holds other things, or source audio.
        NotADirectoryError: as :func:`pipeline.outputs.check_replaceable`.
    """
    out = check_replaceable(out_dir)
    refuse_inputs_inside(out_dir, sources, what="source audio", instead="data/augmented")
    if out.is_dir() and any(out.iterdir()):
        manifest_csv = out / "manifest.csv"
        header = ""
        if manifest_csv.is_file():
            with manifest_csv.open() as f:
                header = f.readline()
        foreign = [str(p.relative_to(out)) for p in out.rglob("*")
                   if p.parent != out and p.is_file() and p.suffix != ".flac"]  # copies' folders hold copies only
        if not {"source_id", "augmentation"} <= set(header.strip().split(",")) or foreign:
            found = foreign or sorted(p.name for p in out.iterdir())
            raise ValueError(f"--out {out_dir}: expected an earlier output of this stage (its manifest.csv with "
                             f"source_id and augmentation, folders of .flac copies) or an empty folder, found "
                             f"{len(found)} other entries (e.g. {found[:3]}), which replacing it would delete. "
                             "Choose another --out, or move them away.")
    return out


def augment(manifest: pd.DataFrame, splits: pd.DataFrame, *, out_dir: str | os.PathLike,
            chain: Mapping[str, Mapping], copies: int = 1, seed: int = 0, balance: bool = False,
            label_set: str | None = None, merge_calm: bool = False, workers: int | None = None,
            progress: bool = True) -> pd.DataFrame:
    """Write augmented copies of the training utterances and ``out_dir/manifest.csv`` (+ ``rejects.csv``).

    Args:
        manifest: the manifest (``id, path, emotion, duration_s, ...``).
        splits: long-format split ``fold, id, partition``; sources are the ids in any ``train`` partition.
        out_dir: output folder; copy ``<source id>_aug<k>`` is written to ``out_dir/<source id>_aug<k>.flac``.
        chain: ``{transform: {param: value}}`` with names from :data:`TRANSFORMS`, applied in order.
        copies: copies per source (0: none, unless ``balance`` tops minority classes up).
        seed: base seed; each copy is seeded by ``(seed, source id, copy index)``.
        balance: give minority classes more copies so that every class ends with the same count.
        label_set: augment (and balance over) only this label set's emotions; ``None``: every emotion.
        merge_calm: count ``calm`` as ``neutral`` (copies keep their source's own ``emotion``).
        workers: processes (default: every core); the output does not depend on it.
        progress: show a tqdm bar in seconds of source audio augmented per second.

    Returns:
        The augmented manifest: the manifest's columns plus ``source_id`` and ``augmentation``, paths absolute
        (``out_dir/manifest.csv`` holds them relative to ``out_dir``).

    Raises:
        ValueError: negative ``copies``, a bad chain, or training ids missing from the manifest.
    """
    if isinstance(copies, bool) or int(copies) != copies or copies < 0:
        raise ValueError(f"expected copies to be a whole number >= 0, found {copies!r}; use 0 to turn "
                         "augmentation off.")
    build_chain(chain)
    if (copies or balance) and not any(float((p or {}).get("p", 0.5)) > 0 for p in chain.values()):
        raise ValueError(f"expected a chain with a transform of p > 0, found {dict(chain) or 'no chain'}, so "
                         "copies would equal their sources; pass --chain params.yaml --chain-key "
                         "augment.chain, or set copies: 0 and balance: false.")
    train_ids = set(splits.loc[splits["partition"] == "train", "id"])
    missing = sorted(train_ids - set(manifest["id"]))
    if missing:
        raise ValueError(f"{len(missing)} training ids of the split are not in the manifest (e.g. "
                         f"{missing[:3]}); expected a split made from this manifest. Rerun the split stage.")
    train = manifest[manifest["id"].isin(train_ids)]
    if label_set is not None and not train.empty:
        selection = select_labels(train, label_set, merge_calm=merge_calm)
        print(f"augment: label set {label_set!r} leaves out {selection.excluded or 'nothing'}")
        classes = selection.frame.set_index("id")["emotion"]
    else:
        classes = train.set_index("id")["emotion"].replace({"calm": "neutral"} if merge_calm else {})
    plan = plan_copies(classes, copies=int(copies), balance=balance, seed=seed)
    sources = train.set_index("id").loc[plan.index[plan > 0]]
    rows, rejects = [], []
    total = float((sources["duration_s"] * plan[sources.index]).sum())
    out_dir = _own_folder(out_dir, manifest["path"])
    # written aside and swapped in whole: a killed or failed run leaves the previous copies and manifest as they were
    with (replaced_whole(out_dir, carry=_carried) as staging,
          _mapper(workers or len(os.sched_getaffinity(0))) as run,
          tqdm(total=total, unit="s", unit_scale=True, desc="augment", disable=not progress) as bar):
        tasks = [(row.path, row.Index, range(plan[row.Index]), dict(chain), seed, str(staging))
                 for row in sources.itertuples()]
        for (path, uid, *_), (results, error) in zip(tasks, run(_augment_source, tasks), strict=True):
            if error:
                rejects.append({"path": path, "reason": error[0], "detail": error[1]})
            for copy_id, description, frames in results:
                rows.append({**sources.loc[uid].to_dict(), "id": copy_id, "source_id": uid,
                             "path": f"{copy_id}.flac",  # relative to the manifest's folder
                             "duration_s": frames / SAMPLE_RATE, "sample_rate": SAMPLE_RATE,
                             "channels": 1, "augmentation": description})
                bar.update(sources.at[uid, "duration_s"])
        if len(tasks) and len(rejects) == len(tasks):  # the audio is not there (a disk not mounted?): keep the old
            counts = pd.Series([r["reason"] for r in rejects]).value_counts().to_dict()
            raise ValueError(f"expected readable training audio, found all {len(tasks)} sources rejected "
                             f"({', '.join(f'{n} {r}' for r, n in counts.items())}; e.g. {rejects[0]['detail']}). "
                             f"Nothing was written: {out_dir} holds what it held before. Check that the audio is "
                             "where the manifest says, then rerun.")
        out = pd.DataFrame(rows, columns=[*manifest.columns, *EXTRA_COLUMNS])
        out.to_csv(staging / "manifest.csv", index=False)
        pd.DataFrame(rejects, columns=["path", "reason", "detail"]).to_csv(staging / "rejects.csv", index=False)
    final = pd.concat([classes, classes.loc[out["source_id"]]]).value_counts().sort_index()
    print(f"augment: {len(out)} copies of {len(tasks) - len(rejects)} training utterances; {len(rejects)} "
          f"sources unreadable, skipped (listed in {out_dir / 'rejects.csv'}); utterances per class with "
          f"copies: {final.to_dict()}")
    return resolve_paths(out, out_dir / "manifest.csv")


#: Where the command line finds its chain without ``--chain``: the project's params.yaml, the one place of the
#: pipeline's settings (its default chain is the seed system's noise and time stretch, with pitch and gain).
DEFAULT_CHAIN = ("params.yaml", "augment.chain")


def read_chain(path: str | os.PathLike, key: str | None = None) -> dict:
    """The chain mapping in a YAML/JSON file, at a dotted ``key`` (e.g. ``augment.chain``) if given.

    Raises:
        ValueError: the file is missing or lacks the key.
    """
    if not Path(path).is_file():
        raise ValueError(f"expected the augmentation chain in {path}, found no such file; run from the project "
                         "folder (its params.yaml) or pass --chain FILE [--chain-key KEY].")
    node = yaml.safe_load(Path(path).read_text())
    for part in key.split(".") if key else []:
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"{path}: expected a key {key!r}, found no {part!r}; check the augment block.")
        node = node[part]
    return dict(node or {})


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.augment", description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, type=existing_file)
    parser.add_argument("--split", required=True, type=existing_file, help="splits CSV (its splits.json beside it)")
    parser.add_argument("--out", required=True, type=output_dir, help="output folder; manifest.csv and rejects.csv go there")
    parser.add_argument("--copies", type=non_negative_int, default=1, help="copies per training utterance (0: off)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--balance", type=boolean, nargs="?", const=True, default=False,
                        help="more copies for minority classes, equal counts in the end")
    parser.add_argument("--label-set", default=None, help="balance over this label set (default: all)")
    parser.add_argument("--merge-calm", type=boolean, nargs="?", const=True, default=False,
                        help="count calm as neutral when balancing")
    parser.add_argument("--chain", default=None, type=existing_file,
                        help=f"YAML/JSON file with the chain (default: {DEFAULT_CHAIN[0]} of the working directory)")
    parser.add_argument("--chain-key", default=None,
                        help=f"dotted key of the chain in it (default with the default file: {DEFAULT_CHAIN[1]})")
    parser.add_argument("--workers", type=positive_int, default=None, help="processes (default: every core)")
    args = parser.parse_args(argv)
    try:
        refuse_inputs_inside(args.out, [args.manifest, args.split], what="its inputs", instead="data/augmented")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        chain = read_chain(*((args.chain, args.chain_key) if args.chain
                             else (DEFAULT_CHAIN[0], args.chain_key or DEFAULT_CHAIN[1])))
        manifest = read_manifests([args.manifest])  # unique ids, paths resolved
        splits, _ = read_split(args.split)
        augment(manifest, splits, out_dir=args.out, chain=chain, copies=args.copies, seed=args.seed,
                balance=args.balance, label_set=args.label_set, merge_calm=args.merge_calm,
                workers=args.workers)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
