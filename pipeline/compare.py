"""The comparison stage: one table of every system, with confidence intervals, significance, plots and a report.

Reads run directories (``heads.train``, ``baselines.train``), groups runs that differ only in their seed into
systems (``evaluation.systems``), recomputes every figure from ``predictions.csv`` with the definitions of
``pipeline.metrics`` (so heads and baselines are scored by one code path; a run whose own ``metrics.json``
disagrees is named in the report), and writes into ``--out``:

* ``table.md``, ``table.csv``, ``table.tex``: one row per system (columns :data:`TABLE_COLUMNS`, then :data:`EXTRA_COLUMNS`),
  one table per label set: runs of different label sets are never ranked together.
* ``metrics.json``: ``{system: {ua, wa, macro_f1, ...}}`` for ``dvc metrics show/diff``.
* ``leakage.csv``, ``cross_corpus.csv`` (header only when there is nothing to show), ``report.md``,
  ``figures/*.png`` and ``plots/{confusion,train_loss,val_loss,val_acc}/<system>.csv`` for ``dvc plots``.

Usage:
    python -m pipeline.compare data/runs/rf_egemaps data/runs/conv_egemaps --out data/compare
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation import report, stats
from evaluation.audits import cross_corpus, leakage
from evaluation.results import Result
from evaluation.systems import System, augmented, group_systems
from pipeline.cli import existing_dir, existing_file, non_negative_int, output_dir, positive_int, run_main
from pipeline.metrics import SCORES, scores
from pipeline.outputs import check_replaceable, refuse_inputs_inside, replaced_whole
from training.rundir import Run, load_run, recover_run

TABLE_COLUMNS = ["system", "ua", "wa", "macro_f1", "ua_std", "wa_std", "macro_f1_std", "ua_ci_low", "ua_ci_high",
           "n_test", "n_speakers", "p_value"]
EXTRA_COLUMNS = ["label_set", "model", "feature_set", "features", "augmentation", "split_scheme", "speaker_independent",
         "n_folds", "normalisation", "corpora", "n_runs", "seeds", "baseline", "note", "runs", "encoder",
         "probe_layer"]


class TableFormat(StrEnum):
    """The exports of the comparison table."""

    MD = "md"
    CSV = "csv"
    LATEX = "latex"


#: Claims in a run's metrics.json further than this from the recomputed figure are reported.
_TOLERANCE = 1e-4


def score_system(system: System, *, resamples: int, seed: int, speaker_of: Callable | None = None) -> Result:
    """Fold figures (mean and population std over every fold of every run), bootstrap CI and counts.

    Args:
        system: the runs of one configuration.
        resamples: bootstrap resamples.
        seed: bootstrap seed.
        speaker_of: id → speaker (from a manifest); otherwise the runs' ``test_speakers``/``n_speakers``.
    """
    index = {name: i for i, name in enumerate(system.labels)}
    rows, notes = [], []
    for r, run in enumerate(system.runs):
        own = []
        for fold, group in run.predictions.groupby("fold", sort=True):
            own.append({"run": r, "fold": int(fold),
                        **scores(group["true"].map(index).to_numpy(), group["pred"].map(index).to_numpy())})
        rows += own
        for key in SCORES:
            claimed, found = run.metrics.get(key), float(np.mean([f[key] for f in own]))
            if claimed is not None and abs(float(claimed) - found) > _TOLERANCE:
                notes.append(f"{run.path}: metrics.json says {key} = {float(claimed):.4f}, its predictions.csv "
                             f"gives {found:.4f}; the table uses the predictions.")
    folds = pd.DataFrame(rows)
    structure = stats.ua_structure([run.predictions for run in system.runs])
    low, high = stats.bootstrap_ci(structure, resamples=resamples, seed=seed)
    figures = {key: float(folds[key].mean()) for key in SCORES}
    figures.update({f"{key}_std": float(folds[key].std(ddof=0)) for key in SCORES})
    if not low <= figures["ua"] <= high:
        notes.append(f"the bootstrap interval [{low:.4f}, {high:.4f}] misses ua = {figures['ua']:.4f}.")
    if len({frozenset(_assignment(run)[1]) for run in system.runs}) > 1:
        notes.append(f"{system.name}: its runs differ in their split (the assignment of utterances to folds), not "
                     "only in their seed; its figures average over splits.")
    p = system.protocol
    row = {"system": system.name, **figures, "ua_ci_low": low, "ua_ci_high": high,
           "n_test": len(structure.ids), "n_speakers": _speakers(system, structure.ids, speaker_of),
           "p_value": np.nan, "label_set": system.label_group, "model": p.get("model"),
           "feature_set": p.get("feature_set"), "features": _text(p.get("features")),
           "augmentation": augmented(p), "split_scheme": p.get("split_scheme"),
           "speaker_independent": p.get("speaker_independent"), "n_folds": p.get("n_folds"),
           "normalisation": _text(p.get("normalisation")), "corpora": _text(p.get("corpora")),
           "n_runs": len(system.runs), "seeds": _text(system.seeds), "baseline": "", "note": "",
           "runs": " ".join(str(run.path) for run in system.runs), "encoder": _text(p.get("encoder")),
           "probe_layer": p.get("probe_layer", np.nan)}
    return Result(system, row, structure, folds, notes)


def _assignment(run: Run) -> tuple[dict, set]:
    """A run's ground truth per test utterance and its (utterance, fold) pairs (a cross-corpus scheme may test one
    utterance in several folds)."""
    p = run.predictions
    return dict(zip(p["id"], p["true"], strict=True)), set(zip(p["id"], p["fold"], strict=True))


def _mismatch(a: System, b: System) -> str | None:
    """Why a paired test of ``a`` against ``b`` would compare unlike things, or None: another ground truth for
    some utterance (other manifests or label mapping), or other assignments of utterances to folds (another
    split, e.g. a random split of another seed), over all the runs of each system whatever their order."""
    truth_b = {uid: label for run in b.runs for uid, label in _assignment(run)[0].items()}
    differ = {uid for run in a.runs for uid, label in _assignment(run)[0].items() if truth_b.get(uid, label) != label}
    if differ:
        return f"another ground truth for {len(differ)} test utterances (other manifests or labels)"
    splits_a, splits_b = ({frozenset(_assignment(run)[1]) for run in s.runs} for s in (a, b))
    if splits_a != splits_b:  # every run's split, in any order: the pairs are the utterances of all of them
        return "another assignment of utterances to folds (another split)"
    return None


def add_p_values(results: list[Result], *, resamples: int, seed: int, baseline: str | None = None) -> None:
    """Set ``p_value`` (and ``baseline``, ``note``) of every row against the eGeMAPS RandomForest reference.

    The reference of a system is the eGeMAPS RandomForest (or the system named by ``baseline``) of the same label
    set and split scheme, tested on exactly the same utterances; of several, the one with the same augmentation.
    Without one the p-value stays empty and ``note`` says why.

    Raises:
        ValueError: ``baseline`` names no system.
    """
    if baseline is not None and baseline not in {r.system.name for r in results}:
        raise ValueError(f"--baseline {baseline!r} names no system; expected one of "
                         f"{[r.system.name for r in results]}.")
    for result in results:
        s = result.system
        refs = [r for r in results if r.system.label_group == s.label_group
                and (r.system.name == baseline if baseline else r.system.is_rf_egemaps)]
        if not refs:
            result.row["note"] = ("no baseline run" if baseline else "no eGeMAPS RandomForest run") + \
                " with this label set; not tested"
            continue
        same = [r for r in refs if np.array_equal(r.structure.ids, result.structure.ids)]
        if not same:
            result.row["note"] = (f"test utterances differ from {', '.join(r.system.name for r in refs)}; "
                                  "not tested")
            continue
        split = [r for r in same if r.row["split_scheme"] == result.row["split_scheme"]]
        if not split:
            result.row["note"] = (f"no baseline under the {result.row['split_scheme']} split (only "
                                  f"{', '.join(r.system.name for r in same)}); not tested")
            continue
        aligned = [r for r in split if _mismatch(result.system, r.system) is None]
        if not aligned:
            result.row["note"] = (f"{_mismatch(result.system, split[0].system)} than {split[0].system.name}; "
                                  "not tested")
            continue
        same = sorted(aligned, key=lambda r: (augmented(r.system.protocol) != augmented(s.protocol),
                                              augmented(r.system.protocol)))
        ref = same[0]
        result.row["baseline"] = ref.system.name
        result.row["p_value"] = 1.0 if ref is result else stats.paired_permutation_test(
            result.structure, ref.structure, resamples=resamples, seed=seed)


def expand_run_dirs(paths: Sequence[str | os.PathLike], skipped: list[str] | None = None) -> list[Path]:
    """Run directories from paths that are run directories or folders of them (searched at any depth, sorted).

    A folder is a run directory when it holds ``metrics.json``; ``dvc repro`` passes ``data/runs`` and
    ``data/probes``, so no stage keeps a list of systems by hand. Below a folder, trainers' staging folders and
    replaced runs (names starting with ``.`` or ending in ``.tmp``) and run directories without ``metrics.json``
    are skipped and reported on stderr (and appended to ``skipped``, which the report lists), never averaged in.
    A named run that a killed trainer left half-swapped is put back first (:func:`training.rundir.recover_run`).

    Raises:
        FileNotFoundError: a path that does not exist, or a folder without any run directory below it.
    """
    skipped = [] if skipped is None else skipped

    def skip(text: str) -> None:
        print(f"skipped {text}", file=sys.stderr)
        skipped.append(text)

    found, walked = [], {}
    for path in map(recover_run, paths):
        if (path / "metrics.json").is_file() or not path.is_dir():
            found.append(path)  # load_run says what is missing
            continue
        below, seen_twice = [], False
        for run in _candidate_runs(path, skip):
            staging = any(p.startswith(".") or p.endswith(".tmp") for p in run.relative_to(path).parts)
            complete = (run / "metrics.json").is_file()
            if complete and not staging and os.path.realpath(run) in walked:  # linked into two of the folders
                skip(f"{run}: the same run as {walked[os.path.realpath(run)]}, listed once")
                seen_twice = True
            elif complete and not staging:
                walked[os.path.realpath(run)] = run
                below.append(run)
            elif complete:  # a trainer's staging folder or a replaced run an interrupted commit left
                skip(f"{run}: a run being written or replaced (a trainer's staging folder); a finished training "
                     "swaps it in, and its next run or `load_run` of the run beside it cleans it up")
            elif not staging:
                skip(f"{run}: a run directory without metrics.json (interrupted or damaged); re-run its train stage")
        if not below and not seen_twice:
            raise FileNotFoundError(f"{path} holds no run directory (no metrics.json at any depth); expected "
                                    "a run directory of heads.train / baselines.train or a folder of them.")
        found += below
    return found


def _candidate_runs(top: Path, skip: Callable[[str], None]) -> list[Path]:
    """Folders below ``top`` holding a run's ``metrics.json``, ``predictions.csv`` or ``models``, sorted; folder
    links are followed (a run linked into a runs folder is a run), each real folder once."""
    found, seen = set(), {}
    for folder, dirs, files in os.walk(top, followlinks=True):
        dirs.sort()  # the same folder kept, whichever way the file system lists them
        real = os.path.realpath(folder)
        if real in seen:  # a second way into a folder already walked (a link to it)
            skip(f"{folder}: the same folder as {seen[real]}, listed once")
            dirs[:] = []
            continue
        seen[real] = folder
        if {"metrics.json", "predictions.csv", "models"} & {*files, *dirs}:
            found.add(Path(folder))
    return sorted(found)


def compare(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, formats: Sequence[str] = tuple(TableFormat),
            resamples: int = 2000, seed: int = 0, manifests: Sequence[str | os.PathLike] = (),
            baseline: str | None = None) -> pd.DataFrame:
    """Compare run directories and write tables, plots and the report into ``out``.

    Args:
        run_dirs: run directories of ``heads.train`` / ``baselines.train``, or folders of them.
        out: output directory (its ``figures/`` and ``plots/`` are rewritten).
        formats: any of ``md``, ``csv``, ``latex``.
        resamples: bootstrap resamples and permutation-test swaps.
        seed: seed of both.
        manifests: manifests giving each id's corpus and speaker (optional; otherwise the corpus is the
            prefix of the id and speakers come from the runs).
        baseline: name of the reference system for the p-values (default: the eGeMAPS RandomForest).

    Returns:
        The table, one row per system (all label sets).

    Raises:
        ValueError: no run directory, an unknown format, or runs that break the contract.
    """
    unknown = sorted(set(formats) - set(TableFormat))
    if unknown or not run_dirs:
        raise ValueError(f"expected run directories and formats among {[str(f) for f in TableFormat]}, found "
                         f"{len(run_dirs)} directories and formats {list(formats)}; pass e.g. "
                         "`data/runs/rf_egemaps --format md,csv`.")
    check_replaceable(out)  # before the work: a file, a symbolic link, a mount point cannot be replaced whole
    refuse_inputs_inside(out, run_dirs, what="run directories", instead="data/compare")
    corpus_of, speaker_of = _manifest_lookups(manifests)
    skipped: list[str] = []
    runs: list[Run] = [load_run(d) for d in expand_run_dirs(run_dirs, skipped)]
    systems = group_systems(runs)
    results = [score_system(s, resamples=resamples, seed=seed, speaker_of=speaker_of) for s in systems]
    add_p_values(results, resamples=resamples, seed=seed, baseline=baseline)
    table = pd.DataFrame([r.row for r in results], columns=TABLE_COLUMNS + EXTRA_COLUMNS)
    # written aside and swapped in whole: a killed or failed comparison leaves the previous one as it was
    with replaced_whole(out, carry=lambda entry: entry.name not in OUTPUTS) as staging:
        report.write_all(staging, results, table, leakage(results), cross_corpus(results, corpus_of),
                         formats=list(formats), resamples=resamples, seed=seed, baseline=baseline,
                         skipped=skipped)
    return table


#: What a comparison writes into its --out (anything else there is carried into each new output).
OUTPUTS = frozenset({"table.csv", "table.md", "table.tex", "metrics.json", "leakage.csv", "cross_corpus.csv",
                     "report.md", "figures", "plots"})


@run_main
def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m pipeline.compare RUN_DIR... --out DIR [--format md,csv,latex]``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", type=lambda text: existing_dir(str(recover_run(text))),
                        help="run directories to compare, or folders of them (e.g. data/runs)")
    parser.add_argument("--out", required=True, type=output_dir, help="output directory")
    parser.add_argument("--format", default=",".join(TableFormat), help="comma-separated: md, csv, latex")
    parser.add_argument("--resamples", type=positive_int, default=2000, help="bootstrap resamples and permutation swaps")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the resampling")
    parser.add_argument("--manifest", action="append", default=[], type=existing_file, help="manifest(s) for corpus and speaker")
    parser.add_argument("--baseline", help="reference system for p-values (default: eGeMAPS RandomForest)")
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    table = compare(args.runs, args.out, formats=formats, resamples=args.resamples, seed=args.seed,
                    manifests=args.manifest, baseline=args.baseline)
    print(table[TABLE_COLUMNS].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"wrote {args.out}/report.md")
    return 0


def _manifest_lookups(manifests: Sequence[str | os.PathLike]) -> tuple[Callable, Callable | None]:
    if not manifests:
        return (lambda uid: str(uid).split("/")[0]), None
    frame = pd.concat([pd.read_csv(m, usecols=["id", "corpus", "speaker"], dtype=str) for m in manifests])
    corpus, speaker = frame.set_index("id")["corpus"].to_dict(), frame.set_index("id")["speaker"].to_dict()
    return (lambda uid: corpus.get(uid, str(uid).split("/")[0])), speaker.get


def _speakers(system: System, ids: np.ndarray, speaker_of: Callable | None) -> int:
    if speaker_of is not None:
        found = {speaker_of(i) for i in ids} - {None}
        if found:
            return len(found)
    listed = {s for run in system.runs for f in run.metrics.get("folds", []) for s in f.get("test_speakers", [])}
    if listed:
        return len(listed)
    return int(max(run.metrics.get("n_speakers", 0) or 0 for run in system.runs))


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return "+".join(map(str, value))
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
