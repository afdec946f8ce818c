"""Smoke test: the whole DVC pipeline (`dvc repro`) on a handful of synthetic RAVDESS files.

The repository's own dvc.yaml runs in a scratch copy, with params pointing at a synthetic corpus and the tiny
random encoder, and few epochs. A second `dvc repro` must re-run nothing but the (cheap, always-run) pull stage.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "features", "heads", "baselines")

pytestmark = pytest.mark.slow


def _write_corpus(root: Path, write_audio) -> Path:
    for actor in (1, 2, 3, 4):
        for emotion in range(1, 9):
            name = f"03-01-{emotion:02d}-01-01-01-{actor:02d}.wav"
            write_audio(root / f"Actor_{actor:02d}" / name, seconds=1.0, f0=100 + 25 * emotion,
                        seed=actor * 10 + emotion)
    return root


def _params(corpus: Path, encoder: Path) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["corpora"] = {"enabled": ["ravdess"], "sources": {"ravdess": str(corpus)}}
    params["augment"]["copies"] = 1
    params["features"]["encoder"] = str(encoder)
    for settings in params["train"].values():
        if isinstance(settings, dict):
            settings.update({k: v for k, v in {"epochs": 2, "patience": 1, "batch_size": 8, "n_estimators": 20,
                                               "hidden": 16}.items() if k in settings})
    params["compare"]["resamples"] = 50
    return params


def _dvc(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SER_CORPORA_DIR"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(cwd))
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_dvc_repro_runs_every_stage(tmp_path, write_audio, tiny_encoder_dir):
    work = tmp_path / "repo"
    work.mkdir()
    for package in PACKAGES:
        shutil.copytree(REPO / package, work / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    corpus = _write_corpus(tmp_path / "corpora" / "ravdess", write_audio)
    (work / "params.yaml").write_text(yaml.safe_dump(_params(corpus, tiny_encoder_dir)))
    _dvc(work, "init", "--no-scm", "-q")

    _dvc(work, "repro")

    manifest = pd.read_csv(work / "data" / "manifest.csv")
    assert len(manifest) == 32
    augmented = pd.read_csv(work / "data" / "augmented" / "manifest.csv")
    splits = pd.read_csv(work / "data" / "splits.csv")
    assert set(augmented["source_id"]) <= set(splits.loc[splits.partition == "train", "id"])
    table = pd.read_csv(work / "data" / "compare" / "table.csv")
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert len(table) == sum(name.startswith("train_") for name in stages)
    independent = table[table["speaker_independent"]]
    assert set(table["system"]) - set(independent["system"]) == {"rf_egemaps+aug@random"}
    assert table["ua"].between(0, 1).all() and (independent["n_test"] == 32).all()
    assert (table["augmentation"]).all()  # augment.copies 1: every system trained with the copies
    report = (work / "data" / "compare" / "report.md").read_text()
    assert "rf_egemaps+aug@random" in report and "leak" in report.lower()

    assert "ua" in _dvc(work, "metrics", "show")
    again = _dvc(work, "repro")  # pull always runs (cheap); an unchanged corpus re-runs nothing after it
    rerun = [line for line in again.splitlines() if line.startswith("Running stage")]
    assert rerun == ["Running stage 'pull':"], again
