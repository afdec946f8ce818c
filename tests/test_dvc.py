"""Smoke test: the whole DVC pipeline (`dvc repro`) on a handful of synthetic RAVDESS files.

The repository's own dvc.yaml runs in a scratch copy, with params pointing at a synthetic corpus and two tiny
random encoders of different architectures, and few epochs. A second `dvc repro` must re-run nothing but the
(cheap, always-run) pull stage; a change to an imported module makes its stages stale; a second copy of the
project at another path gets the same dvc.lock hashes for the manifest and the splits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import soundfile as sf
import yaml

from tests.test_repo import PACKAGES

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _write_corpus(root: Path, write_audio) -> Path:
    for actor in (1, 2, 3, 4):
        for emotion in range(1, 9):
            name = f"03-01-{emotion:02d}-01-01-01-{actor:02d}.wav"
            write_audio(root / f"Actor_{actor:02d}" / name, seconds=1.0, f0=100 + 25 * emotion,
                        seed=actor * 10 + emotion)
    return root


def _tiny_hubert(out: Path) -> Path:
    """A tiny random HuBERT (another architecture than the conftest's wav2vec2), saved with save_pretrained."""
    import torch
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    torch.manual_seed(1)
    config = HubertConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                          conv_dim=(16, 16, 16), conv_kernel=(10, 8, 4), conv_stride=(5, 8, 8),
                          feat_extract_norm="group", num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                          do_stable_layer_norm=False, vocab_size=8)
    HubertModel(config).eval().save_pretrained(out, safe_serialization=True)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(out)
    return out


def _params(corpus: Path, encoders: dict[str, Path]) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["corpora"] = {"enabled": ["ravdess"], "sources": {"ravdess": str(corpus)}}
    params["augment"]["copies"] = 1
    params["features"]["encoders"] = {name: str(path) for name, path in encoders.items()}
    fast = {"epochs": 2, "patience": 1, "batch_size": 8, "n_estimators": 20, "hidden": 16}
    blocks = [s["settings"] for s in params["systems"].values()] + [*params["encoder_systems"].values(),
                                                                    params["mfcc_cnn"]]
    for settings in blocks:
        settings.update({k: v for k, v in fast.items() if k in settings})
    params["compare"]["resamples"] = 50
    return params


def _copy_project(work: Path) -> None:
    work.mkdir(parents=True)
    for package in PACKAGES:
        shutil.copytree(REPO / package, work / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")


def _dvc(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SER_CORPORA_DIR"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(cwd))
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=1500)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _lock_hashes(work: Path, stage: str) -> dict[str, str]:
    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"][stage]
    return {o["path"]: o["md5"] for o in lock["outs"] if not o["path"].endswith(".json")} | \
        {d["path"]: d["md5"] for d in lock.get("deps", []) if d["path"].startswith("data/")}


def test_dvc_repro_runs_every_stage(tmp_path, write_audio, tiny_encoder_dir):
    work = tmp_path / "repo"
    _copy_project(work)
    corpus = _write_corpus(tmp_path / "corpora" / "ravdess", write_audio)
    encoders = {"tiny-w2v2": tiny_encoder_dir, "tiny-hubert": _tiny_hubert(tmp_path / "tiny-hubert")}
    (work / "params.yaml").write_text(yaml.safe_dump(_params(corpus, encoders)))
    _dvc(work, "init", "--no-scm", "-q")

    _dvc(work, "repro")

    manifest = pd.read_csv(work / "data" / "manifest.csv")
    assert len(manifest) == 32 and not manifest["path"].str.startswith("/").any()  # root-relative paths
    augmented = pd.read_csv(work / "data" / "augmented" / "manifest.csv")
    splits = pd.read_csv(work / "data" / "splits.csv")
    assert set(augmented["source_id"]) <= set(splits.loc[splits.partition == "train", "id"])
    table = pd.read_csv(work / "data" / "compare" / "table.csv")
    params = yaml.safe_load((work / "params.yaml").read_text())
    systems = table[table["probe_layer"].isna()]
    expected = {*(s["settings"].get("system", name) for name, s in params["systems"].items()), "mfcc_cnn",
                *(f"{head}_{enc}" for head in params["encoder_systems"] for enc in encoders)}
    assert {name.split("+")[0].split("@")[0] for name in systems["system"]} == expected - {"rf_egemaps_random"}
    assert len(systems) == len(params["systems"]) + 1 + len(params["encoder_systems"]) * len(encoders)
    independent = systems[systems["speaker_independent"]]
    assert set(systems["system"]) - set(independent["system"]) == {"rf_egemaps+aug@random"}
    assert systems["ua"].between(0, 1).all() and (independent["n_test"] == 32).all()
    assert (systems["augmentation"]).all()  # augment.copies 1: every system trained with the copies
    for enc, path in encoders.items():  # one row per (system, encoder), the encoder recorded
        rows = systems[systems["system"].str.contains(f"_{enc}")]
        assert len(rows) == len(params["encoder_systems"]) and set(rows["encoder"]) == {str(path)}
    probes = table[table["probe_layer"].notna()]
    layers = {"tiny-w2v2": 4, "tiny-hubert": 3}  # hidden states: the input and each transformer layer
    assert probes.groupby("encoder").size().to_dict() == {str(encoders[e]): n for e, n in layers.items()}
    assert probes["ua_ci_low"].le(probes["ua"]).all() and probes["ua"].le(probes["ua_ci_high"]).all()
    report = (work / "data" / "compare" / "report.md").read_text()
    assert "figures/layers.png" in report and (work / "data" / "compare" / "figures" / "layers.png").is_file()
    assert "Per-layer probe" in (work / "data" / "compare" / "table.md").read_text()
    leakage = pd.read_csv(work / "data" / "compare" / "leakage.csv")
    assert leakage["system"].tolist() == ["rf_egemaps+aug"] and "leak" in report.lower()

    assert "ua" in _dvc(work, "metrics", "show")
    again = _dvc(work, "repro")  # pull always runs (cheap); an unchanged corpus re-runs nothing after it
    rerun = [line for line in again.splitlines() if line.startswith("Running stage")]
    assert rerun == ["Running stage 'pull':"], again

    (work / "data" / "runs" / "conv_egemaps" / "history.csv").unlink()  # every file of a run is an output
    copy = next((work / "data" / "augmented").rglob("*.flac"))
    copy.write_bytes(copy.read_bytes())  # the same bytes, rewritten: unchanged content is not a change
    assert "train@conv_egemaps" in (stale := _dvc(work, "status")) and "extract@" not in stale, stale
    _dvc(work, "checkout", "train@conv_egemaps")  # restored from the cache
    assert (work / "data" / "runs" / "conv_egemaps" / "history.csv").is_file()
    wave, rate = sf.read(copy)
    sf.write(copy, wave[::-1], rate)  # another transform's output under the same manifest row
    stale = _dvc(work, "status")
    assert "egemaps:" in stale and all(f"extract@{e}:" in stale for e in encoders), stale

    labels = work / "pipeline" / "labels.py"
    labels.write_text(labels.read_text() + "\n# a change to the label mapping's module\n")
    stale = _dvc(work, "status")
    trainers = [n for n in _dvc(work, "stage", "list", "--name-only").split() if n.startswith(("train", "probe"))]
    assert trainers and all(f"{name}:" in stale for name in trainers), stale

    clone = tmp_path / "elsewhere" / "deeper" / "clone"  # the same project at another path
    _copy_project(clone)
    shutil.copy(work / "params.yaml", clone / "params.yaml")
    _dvc(clone, "init", "--no-scm", "-q")
    _dvc(clone, "repro", "split", "split_random")
    for stage in ("manifest", "split", "split_random"):
        assert _lock_hashes(clone, stage) == _lock_hashes(work, stage), stage
