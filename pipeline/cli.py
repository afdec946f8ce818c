"""The one shared helper of every command line (``pipeline``, ``features``, ``heads``, ``baselines``).

Two halves:

* argparse ``type=`` functions and one action that check a value *before any work starts*, so a bad option
  ends at once as argparse's usage error (exit 2) instead of a crash, or a silently wrong run, an hour later:
  :func:`positive_int`, :func:`non_negative_int`, :func:`positive_float`, :func:`non_negative_float`,
  :func:`existing_file`, :func:`existing_dir`, :func:`existing_path`, :func:`output_dir`, :func:`output_file`,
  and :class:`LayerList` (``--layers 0 3`` or ``--layers 0,3``; duplicates and negatives refused).
* :func:`run_main`, a decorator for ``main(argv=None) -> int`` that turns the expected failures into one
  ``error: ...`` line on stderr, without a traceback: :class:`UsageError` (a bad command line found after
  parsing, e.g. two options that contradict each other) exits 2; ``ValueError`` and ``OSError`` (bad data:
  a corrupt file, an inconsistent run, a full disk) exit 1; Ctrl-C exits 130. Anything else is a bug and
  keeps its traceback.

Every message follows the house rule: what was expected, what was found, what to do.

Example:
    >>> parser = argparse.ArgumentParser()
    >>> _ = parser.add_argument("--epochs", type=positive_int)
    >>> _ = parser.add_argument("--layers", action=LayerList)
    >>> parser.parse_args(["--epochs", "3", "--layers", "0,2", "5"])
    Namespace(epochs=3, layers=[0, 2, 5])

    Using the wrapper::

        @run_main
        def main(argv=None) -> int:
            args = parser.parse_args(argv)
            ...
            return 0

        if __name__ == "__main__":
            sys.exit(main())
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


class UsageError(ValueError):
    """A command line that parses but cannot be right (exit status 2 under :func:`run_main`)."""


def _number(text: str, kind: type, what: str, accept: Callable[[float], bool]):
    """``text`` as a ``kind`` (a finite one for floats) that ``accept`` takes; else argparse's usage error."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        value = None
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or not accept(value):
        raise argparse.ArgumentTypeError(f"expected {what}, found {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1 (epochs, batch size, folds, workers, ...)."""
    return _number(text, int, "a whole number of at least 1", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    """A whole number of at least 0 (``0`` usually meaning "off": patience, copies, ``--max-frames``)."""
    return _number(text, int, "a whole number of at least 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    """A finite number above 0 (learning rate, seconds, ...)."""
    return _number(text, float, "a finite number above 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    """A finite number of at least 0 (weight decay, dropout's lower bound, ...)."""
    return _number(text, float, "a finite number of at least 0", lambda v: v >= 0)


def probability(text: str) -> float:
    """A number in ``[0, 1)`` (dropout)."""
    return _number(text, float, "a number from 0 up to (not including) 1", lambda v: 0 <= v < 1)


def boolean(text: str) -> bool:
    """``true/false`` (as DVC writes booleans), ``yes/no`` or ``1/0``, any case."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, found {text!r}")
    return value


def existing_file(text: str) -> str:
    """A path to a file that exists (not a folder)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file, found the folder {text!r}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"expected an existing file, found no file at {text!r}")
    return text


def existing_dir(text: str) -> str:
    """A path to a folder that exists."""
    path = Path(text)
    if path.is_file():
        raise argparse.ArgumentTypeError(f"expected a folder, found the file {text!r}")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"expected an existing folder, found nothing at {text!r}")
    return text


def existing_path(text: str) -> str:
    """A path to a file or folder that exists."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"expected an existing file or folder, found nothing at {text!r}")
    return text


def output_dir(text: str) -> str:
    """A folder to write into: absent (it will be made) or a folder, never an existing file, and not below one."""
    path = Path(text)
    for candidate in (path, *path.parents):
        if candidate.exists() and not candidate.is_dir():
            raise argparse.ArgumentTypeError(
                f"expected a folder to write into, found the file {str(candidate)!r}; remove it or choose "
                "another path")
    return text


def output_file(text: str) -> str:
    """A file to write: absent or a file, never an existing folder, and not below an existing file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file to write, found the folder {text!r}; name a file "
                                         "inside it")
    for candidate in path.parents:
        if candidate.exists() and not candidate.is_dir():
            raise argparse.ArgumentTypeError(
                f"expected {text!r} inside a folder, found the file {str(candidate)!r} on its path")
    return text


def layer_positions(values: Sequence[str]) -> list[int]:
    """Whole numbers of at least 0 from ``["0", "3"]`` or ``["0,3"]``, each once.

    Raises:
        argparse.ArgumentTypeError: a value that is not such a number, or one given twice.
    """
    layers = [non_negative_int(part.strip()) for value in values for part in str(value).split(",") if part.strip()]
    twice = sorted({i for i in layers if layers.count(i) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"expected each layer once, found {twice} more than once in "
                                         f"{' '.join(map(str, values))!r}; drop the repeats")
    return layers


class LayerList(argparse.Action):
    """``--layers 0 3`` or ``--layers 0,3``: distinct layer positions (``nargs="*"``; none given: ``None``,
    meaning every layer)."""

    def __init__(self, option_strings, dest, nargs="*", **kwargs):
        super().__init__(option_strings, dest, nargs=nargs, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, layer_positions(values or []) or None)
        except argparse.ArgumentTypeError as err:
            parser.error(f"argument {option_string}: {err}")


def run_main(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap ``main(argv=None)`` so that expected failures print ``error: ...`` and return an exit status.

    :class:`UsageError` returns 2, ``ValueError``/``OSError`` 1, ``KeyboardInterrupt`` 130; argparse's own
    ``SystemExit`` passes through (it already printed the usage and exits 2). The returned status of ``main``
    is kept; ``None`` or a result that is not an int (a stage's summary) becomes 0.
    """

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            status = main(*args, **kwargs)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except (ValueError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("error: interrupted; whatever an earlier run wrote is left as it was.", file=sys.stderr)
            return 130
        return status if isinstance(status, int) and not isinstance(status, bool) else 0

    return wrapped
