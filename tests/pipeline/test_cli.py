"""pipeline.cli: the checks every command line shares, and the error: lines instead of tracebacks."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from pipeline.cli import (
    LayerList,
    UsageError,
    existing_file,
    non_negative_int,
    output_dir,
    output_file,
    positive_float,
    positive_int,
    run_main,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    parser.add_argument("--epochs", type=positive_int)
    parser.add_argument("--max-frames", type=non_negative_int)
    parser.add_argument("--lr", type=positive_float)
    parser.add_argument("--layers", action=LayerList)
    parser.add_argument("--input", type=existing_file)
    parser.add_argument("--out", type=output_dir)
    parser.add_argument("--plot", type=output_file)
    return parser


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs: expected a whole number of at least 1, found '0'"),
    (["--epochs", "-3"], "--epochs: expected a whole number of at least 1, found '-3'"),
    (["--epochs", "2.5"], "--epochs: expected a whole number of at least 1, found '2.5'"),
    (["--max-frames", "-5"], "--max-frames: expected a whole number of at least 0, found '-5'"),
    (["--lr", "nan"], "--lr: expected a finite number above 0, found 'nan'"),
    (["--lr", "0"], "--lr: expected a finite number above 0, found '0'"),
    (["--layers", "0,0"], "--layers: expected each layer once, found [0] more than once"),
    (["--layers", "1", "3", "1"], "--layers: expected each layer once, found [1] more than once"),
    (["--layers", "-1"], "--layers: expected a whole number of at least 0, found '-1'"),
])
def test_bad_numbers_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_layer_lists_accept_spaces_and_commas():
    assert _parser().parse_args(["--layers", "0,3", "5"]).layers == [0, 3, 5]
    assert _parser().parse_args([]).layers is None


def test_paths_of_the_wrong_kind_are_usage_errors(tmp_path, capsys):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    for argv, message in [(["--input", str(tmp_path)], "expected a file, found the folder"),
                          (["--input", str(tmp_path / "none")], "expected an existing file, found no file"),
                          (["--out", str(a_file)], "expected a folder to write into, found the file"),
                          (["--out", str(a_file / "run")], "expected a folder to write into, found the file"),
                          (["--plot", str(tmp_path)], "expected a file to write, found the folder")]:
        with pytest.raises(SystemExit):
            _parser().parse_args(argv)
        assert message in capsys.readouterr().err
    args = _parser().parse_args(["--input", str(a_file), "--out", str(tmp_path / "new"), "--plot",
                                 str(tmp_path / "p.png")])
    assert args.input == str(a_file)


@pytest.mark.parametrize("error, status", [(UsageError("two options contradict"), 2),
                                           (ValueError("the data is bad"), 1),
                                           (FileNotFoundError("no such thing"), 1),
                                           (KeyboardInterrupt(), 130)])
def test_run_main_turns_expected_failures_into_one_line(error, status, capsys):
    @run_main
    def main(argv=None):
        raise error

    assert main([]) == status
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_run_main_keeps_the_status_and_lets_bugs_show():
    assert run_main(lambda argv=None: None)() == 0
    assert run_main(lambda argv=None: 3)() == 3

    @run_main
    def buggy(argv=None):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        buggy()


def test_a_module_run_prints_no_traceback(tmp_path):
    """As a user runs it: a missing input is one usage line, exit 2."""
    result = subprocess.run([sys.executable, "-m", "pipeline.split", "--manifest", str(tmp_path / "none.csv"),
                             "--scheme", "speaker_kfold", "--out", str(tmp_path / "s.csv")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--manifest: expected an existing file" in result.stderr
