"""Runs are validated where they are read: pipeline.compare refuses a run whose predictions.csv does not match
its metrics.json, with one error line naming the file and what differs, and writes nothing."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from test_compare import synthetic_run

from pipeline.compare import main


@pytest.fixture
def run(tmp_path):
    """A complete 6-fold run written by ``pipeline.metrics.write_run``."""
    return synthetic_run(tmp_path, "rf", folds=6)


def _compare(capsys, out, *runs) -> tuple[int, str]:
    status = main([*map(str, runs), "--out", str(out), "--resamples", "20"])
    return status, capsys.readouterr().err


def _refused(capsys, tmp_path, run, *expected: str) -> None:
    status, err = _compare(capsys, tmp_path / "out", run)
    assert status == 1 and err.startswith("error: ") and "Traceback" not in err
    for text in expected:
        assert text in err
    assert not (tmp_path / "out").exists()


def test_complete_run_is_accepted(run, tmp_path, capsys):
    assert _compare(capsys, tmp_path / "out", run)[0] == 0


def test_half_the_folds_are_refused(run, tmp_path, capsys):
    predictions = pd.read_csv(run / "predictions.csv")
    predictions[predictions["fold"] < 3].to_csv(run / "predictions.csv", index=False)
    _refused(capsys, tmp_path, run, "predictions.csv holds folds [0, 1, 2]", "lists folds [0, 1, 2, 3, 4, 5]")


def test_a_file_cut_mid_line_is_refused(run, tmp_path, capsys):
    data = (run / "predictions.csv").read_bytes()
    (run / "predictions.csv").write_bytes(data[: len(data) // 2])
    _refused(capsys, tmp_path, run, "predictions.csv")


def test_rows_missing_from_a_fold_are_refused(run, tmp_path, capsys):
    predictions = pd.read_csv(run / "predictions.csv")
    predictions.drop(index=predictions.index[predictions["fold"] == 4][:2]).to_csv(run / "predictions.csv",
                                                                                   index=False)
    _refused(capsys, tmp_path, run, "does not match metrics.json (fold 4: 14 rows, n_test 16)")


def test_an_id_twice_in_one_fold_is_refused(run, tmp_path, capsys):
    predictions = pd.read_csv(run / "predictions.csv")
    fold0 = predictions.index[predictions["fold"] == 0]
    predictions.loc[fold0[1], "id"] = predictions.loc[fold0[0], "id"]
    predictions.to_csv(run / "predictions.csv", index=False)
    _refused(capsys, tmp_path, run, "ids appear twice in one fold")


def test_probabilities_that_do_not_sum_to_one_are_refused(run, tmp_path, capsys):
    predictions = pd.read_csv(run / "predictions.csv")
    predictions.loc[3, "happy"] = 0.5
    predictions.to_csv(run / "predictions.csv", index=False)
    _refused(capsys, tmp_path, run, "do not sum to 1", "first: id")


def test_garbage_or_missing_metrics_and_missing_predictions_are_refused(run, tmp_path, capsys):
    metrics = (run / "metrics.json").read_text()
    (run / "metrics.json").write_text(metrics[:200])
    _refused(capsys, tmp_path, run, "metrics.json is not valid JSON")
    (run / "metrics.json").write_text(json.dumps({"labels": ["a"]}))
    _refused(capsys, tmp_path, run, "metrics.json has no 'protocol'")
    (run / "metrics.json").write_text(metrics)
    (run / "predictions.csv").unlink()
    _refused(capsys, tmp_path, run, "predictions.csv not found")


def test_a_missing_run_directory_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "expected an existing folder" in capsys.readouterr().err
