"""The run directory: transactional writes that never lose a run, and reads that refuse an inconsistent one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from pipeline.compare import main
from tests.pipeline.test_compare import synthetic_run
from training.rundir import clean_stale, recover_run, staged_run


def _write(folder, text: str) -> None:
    (folder / "models").mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(text)
    (folder / "models" / "fold_0.json").write_text(text)


def _dead_pid() -> int:
    """The id of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_complete_run_replaces_the_old_and_keeps_foreign_files(tmp_path):
    out = tmp_path / "run"
    _write(out, "old")
    (out / "layer_weights.json").write_text("old weights")  # a trainer output the new run does not write
    (out / ".gitignore").write_text("/models\n")             # not a trainer output: carried over
    with staged_run(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".run.tmp-")
        _write(tmp, "new")
    assert (out / "metrics.json").read_text() == "new" and (out / "models" / "fold_0.json").read_text() == "new"
    assert (out / ".gitignore").read_text() == "/models\n" and not (out / "layer_weights.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failure_leaves_the_old_run_exactly_as_it_was(tmp_path):
    out = tmp_path / "run"
    _write(out, "old")
    with pytest.raises(RuntimeError), staged_run(out) as tmp:
        _write(tmp, "half")
        raise RuntimeError("fold 2 failed")
    assert (out / "metrics.json").read_text() == "old" and (out / "models" / "fold_0.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_kill_between_the_renames_is_recovered(tmp_path):
    out = tmp_path / "run"
    old = tmp_path / f".run.old-{_dead_pid()}"  # what a kill after "old run -> .old-<pid>" leaves
    _write(old, "old")
    assert recover_run(out) == out and (out / "metrics.json").read_text() == "old" and not old.exists()
    probes = tmp_path / "probe"  # a probe's folder of per-layer runs, killed the same way
    old = tmp_path / f".probe.old-{_dead_pid()}"
    _write(old / "layer_00", "old")
    assert recover_run(probes) == probes and (probes / "layer_00" / "metrics.json").read_text() == "old"


def test_stale_staging_and_old_runs_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "run"
    _write(out, "current")
    stale_tmp, stale_old = tmp_path / f".run.tmp-{_dead_pid()}", tmp_path / f".run.old-{_dead_pid()}"
    _write(stale_tmp, "killed mid-run")
    _write(stale_old, "replaced")
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".run.tmp-{trainer.pid}"  # a trainer still running: left alone
        live.mkdir()
        assert sorted(clean_stale(out)) == sorted([stale_tmp, stale_old])
        assert (out / "metrics.json").read_text() == "current" and live.exists()
    finally:
        trainer.kill()
        trainer.wait()


def test_leftovers_under_this_processs_own_pid_are_a_killed_runs_reused_pid(tmp_path):
    out = tmp_path / "run"
    _write(out, "current")
    reused = tmp_path / f".run.old-{os.getpid()}"  # a killed trainer's, whose pid this process now has
    _write(reused, "replaced long ago")
    with staged_run(out) as tmp:  # its swap would need that name: the leftover is cleared first
        _write(tmp, "new")
    assert (out / "metrics.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    shutil.rmtree(out)
    _write(tmp_path / f".run.old-{os.getpid()}", "old")  # killed between the two renames, under the reused pid
    assert recover_run(out) == out and (out / "metrics.json").read_text() == "old"


def test_an_existing_file_as_run_directory_is_refused_before_work(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is a file; expected a run directory"), staged_run(tmp_path / "run"):
        pytest.fail("the block must not run")
    assert (tmp_path / "run").read_text() == "not a folder"


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


def test_a_diverged_training_is_refused_and_the_earlier_run_kept(tmp_path):
    import numpy as np

    from training.rundir import prediction_frame, write_run

    out = tmp_path / "run"
    _write(out, "old")
    labels = ["angry", "happy"]
    proba = np.array([[0.2, 0.8], [np.nan, np.nan], [0.6, 0.4]])
    frame = prediction_frame(["a", "b", "c"], 1, np.array([1, 0, 0]), proba, labels)
    speakers = pd.Series(["s1", "s1", "s2"], index=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"1 test rows \(folds \[1\]\) got probabilities that are not finite"), \
            staged_run(out) as tmp:
        write_run(tmp, labels=labels, predictions=frame, speakers=speakers, protocol={})
    assert (out / "metrics.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_compare_puts_back_a_named_run_a_killed_trainer_left_half_swapped(tmp_path):
    run = synthetic_run(tmp_path / "runs", "rf_0")
    run.rename(run.with_name(f".{run.name}.old-{_dead_pid()}"))  # killed between "old -> .old-<pid>" and the swap
    assert main([str(run), "--out", str(tmp_path / "cmp"), "--resamples", "50"]) == 0
    assert (run / "metrics.json").is_file() and (tmp_path / "cmp" / "table.md").is_file()
