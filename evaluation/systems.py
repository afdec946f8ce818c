"""Grouping run directories (read with ``training.rundir.load_run``) into named systems.

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
import re
from dataclasses import dataclass

from training.rundir import Run

#: Model names of the eGeMAPS RandomForest reference, compared after dropping case and punctuation.
RANDOM_FOREST = {"rf", "randomforest", "randomforestclassifier"}


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
        """The name made safe for file names (two names may give one slug: ``evaluation.report.unique``)."""
        return file_slug(self.name)

    @property
    def is_rf_egemaps(self) -> bool:
        """Whether this is the eGeMAPS RandomForest reference."""
        model = re.sub(r"[^a-z]", "", str(self.protocol.get("model", "")).lower())
        return model in RANDOM_FOREST and "egemaps" in str(self.protocol.get("feature_set", "")).lower()


def file_slug(name: str) -> str:
    """``name`` made safe for file names: every run of other characters than ASCII letters and digits is one ``_``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "system"


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


#: Settings that change how fast a run computes, not what (a RandomForest's ``n_jobs``): runs differing only in
#: them are one system.
COMPUTE_ONLY = frozenset({"n_jobs"})


def what_it_computes(protocol: dict) -> dict:
    """``protocol`` without its :data:`COMPUTE_ONLY` settings: what tells one system from another."""
    settings = protocol.get("settings")
    if not isinstance(settings, dict):
        return dict(protocol)
    return {**protocol, "settings": {k: v for k, v in settings.items() if k not in COMPUTE_ONLY}}


def group_systems(runs: list[Run]) -> list[System]:
    """Group runs that differ only in ``seed`` (and :data:`COMPUTE_ONLY` settings) into systems and give each a unique name.

    Args:
        runs: loaded runs; the order of first appearance is kept.

    Returns:
        The systems, each with its ``label_group``.

    Raises:
        ValueError: the same directory given twice, or one configuration's seed and split in two runs.
    """
    paths = [r.path.resolve() for r in runs]
    twice = sorted({str(p) for p in paths if paths.count(p) > 1})
    if twice:
        raise ValueError(f"run directories {twice} were given more than once; expected each run once. "
                         "Drop the repeats.")
    groups: dict[str, list[Run]] = {}
    for run in runs:
        config = {k: v for k, v in what_it_computes(run.protocol).items() if k != "seed"}
        key = json.dumps([config, list(label_key(run))], sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
    systems = []
    for members in groups.values():
        seen: dict[tuple, Run] = {}
        for run in members:  # one seed on one split twice: the same run, which would be counted twice
            seed = run.protocol.get("seed")
            key = (json.dumps(seed), frozenset(zip(run.predictions["id"], run.predictions["fold"], strict=True)))
            if seed is not None and key in seen:
                raise ValueError(
                    f"runs {seen[key].path} and {run.path} record the same configuration, seed {seed} and split; "
                    "expected one run per seed and split of a configuration (its figures would be counted twice). "
                    "Either one run was copied (drop the copy), or they differ in settings their protocol does "
                    "not record (runs of an older version): give them distinct names with --system, or rerun "
                    "them.")
            seen[key] = run
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
        spread = all(isinstance(s.protocol.get("settings"), dict) for s in clash)
        values = [_flat({**s.protocol, "labels": s.labels}, spread) for s in clash]
        fields = sorted({k for v in values for k in v})
        differ = [k for k in fields if len({json.dumps(v.get(k), default=str) for v in values}) > 1]
        # the classes and the split's corpora per fold only when nothing else tells
        differ = [k for k in differ if k not in {"labels", "train_corpora"}] or differ
        for system, value in zip(clash, values, strict=True):
            system.name += "[" + ",".join(f"{k}={_short(value.get(k))}" for k in differ) + "]"


def _flat(protocol: dict, spread: bool) -> dict:
    """A protocol for naming: with ``spread``, its ``settings`` spread out, so that a name says ``lr=0.01``, not
    the whole dict; without (a run that records none), ``settings`` says only whether it was recorded. Other
    dict-valued fields (a split's ``train_corpora`` per fold) stay whole."""
    flat = {k: v for k, v in protocol.items() if k != "settings"}
    settings = protocol.get("settings")
    if spread:
        flat.update({(k if k not in protocol else f"settings.{k}"): v for k, v in settings.items()})
    else:
        flat["settings"] = "recorded" if settings else "none"
    return flat


def _short(value) -> str:
    if isinstance(value, list | tuple):
        return "+".join(map(_short, value))
    if isinstance(value, dict):  # e.g. the MFCC-CNN's log_mel settings
        return "+".join(f"{k}:{_short(v)}" for k, v in value.items())
    return str(value)
