"""The command-line options every trainer shares, and params.yaml blocks as their defaults.

``heads.train``, ``baselines.train`` and ``baselines.probe`` build their parsers with :func:`add_training_args`
and parse with :func:`parse_with_settings`, so ``--settings params.yaml --settings-key KEY`` gives any option
its default from the pipeline's one place of settings; :func:`run_trainer` runs the work and prints the
headline figures.

Example:
    >>> parser = argparse.ArgumentParser(prog="python -m heads.train")
    >>> add_training_args(parser)
    >>> args = parse_with_settings(parser, ["--settings", "params.yaml", ...])    # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import yaml

from pipeline.cli import (
    LayerList,
    UsageError,
    boolean,
    existing_file,
    layer_positions,
    non_negative_float,
    non_negative_int,
    output_dir,
    positive_float,
    positive_int,
    probability,
)
from pipeline.labels import label_set_names
from pipeline.normalisation import Normalisation
from training.fit import Balance, TrainConfig


def apply_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every option left unset (``None``) from :class:`TrainConfig` (``ensemble``: 1).

    The pipeline's settings of each system live in one place, params.yaml's ``systems`` and
    ``encoder_systems`` blocks, read with ``--settings``; a bare command line falls back to
    :class:`TrainConfig` and the model's own defaults."""
    fallback = {"ensemble": 1, **asdict(TrainConfig())}
    for key, value in fallback.items():
        if getattr(args, key, "absent") is None:
            setattr(args, key, value)
    return args


def run_trainer(out: str, train: Callable[[], dict]) -> int:
    """Run a trainer for a command line and print the headline figures (exit 0); its expected failures are
    left to ``pipeline.cli.run_main`` (one ``error:`` line, exit 1)."""
    metrics = train()
    print(f"{out}: ua {metrics['ua']:.3f} ± {metrics['ua_std']:.3f}, wa {metrics['wa']:.3f}, "
          f"macro_f1 {metrics['macro_f1']:.3f}", file=sys.stderr)
    return 0


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
    parser.add_argument("--merge-calm", type=boolean, nargs="?", const=True, default=False,
                        help="map calm onto neutral (true/false; bare flag: true)")
    parser.add_argument("--augmentation", type=boolean, default=True,
                        help="use augmented copies of the manifests (true/false, default true)")
    parser.add_argument("--out", required=True, type=output_dir, help="run directory")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--normalisation", default=Normalisation.GLOBAL, choices=list(Normalisation))
    parser.add_argument("--epochs", type=positive_int, default=None)
    parser.add_argument("--patience", type=non_negative_int, default=None)
    parser.add_argument("--lr", type=positive_float, default=None)
    parser.add_argument("--weight-decay", type=non_negative_float, default=None)
    parser.add_argument("--batch-size", type=positive_int, default=None)
    parser.add_argument("--max-frames", type=non_negative_int, default=None,
                        help="random training crop / central evaluation crop in frames (0: whole utterances)")
    parser.add_argument("--balance", default=TrainConfig.balance, choices=list(Balance))
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
            parser.set_defaults(**{action.dest: _checked(parser, action, value,
                                                         f"{known.settings}: {known.settings_key}.{name}")})
    return parser.parse_args(argv)


def _checked(parser: argparse.ArgumentParser, action: argparse.Action, value, where: str):
    """A settings value checked and converted as the command line's would be (argparse applies neither ``type``
    nor ``choices`` to defaults that are not strings)."""
    if value is None:
        return value
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            parser.error(f"{where} = {value!r}: expected true or false.")
        return value
    if isinstance(action, LayerList):  # converted by the action itself on the command line
        try:
            return layer_positions(value if isinstance(value, list) else [value]) or None
        except argparse.ArgumentTypeError as err:
            parser.error(f"{where} = {value!r}: {err}.")

    def one(item):
        text = str(item).lower() if isinstance(item, bool) else str(item)
        try:
            item = action.type(text) if action.type is not None else item
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            parser.error(f"{where} = {item!r}: {err}")
        if action.choices is not None and item not in action.choices:
            parser.error(f"{where} = {item!r}: expected one of {', '.join(map(str, action.choices))}.")
        return item

    if action.nargs in {"+", "*"} or isinstance(action.nargs, int):
        return [one(v) for v in (value if isinstance(value, list) else [value])]
    return one(value)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The optimisation settings of parsed options (filled by :func:`apply_defaults`)."""
    return TrainConfig(epochs=args.epochs, patience=args.patience, lr=args.lr, weight_decay=args.weight_decay,
                       batch_size=args.batch_size, max_frames=args.max_frames or None, balance=args.balance)
