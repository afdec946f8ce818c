"""The per-layer probe: one run directory per layer, scored and drawn by the comparison."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from baselines.probe import main as probe_main
from baselines.probe import probe_layers
from features.store import write_store
from pipeline.compare import compare


def _layered_store(path, manifest_csv, *, informative: int, layers: int = 3, dim: int = 4):
    """A store whose pooled statistics carry the class only in hidden state ``informative``."""
    manifest = pd.read_csv(manifest_csv, dtype={"id": str, "speaker": str})
    classes = {e: i for i, e in enumerate(sorted(manifest["emotion"].unique()))}
    rng = np.random.default_rng(0)
    entries = {}
    for uid, emotion in zip(manifest["id"], manifest["emotion"], strict=True):
        pooled = rng.normal(0, 1, (layers, 2 * dim)).astype(np.float32)
        pooled[informative, classes[emotion]] += 4.0
        entries[uid] = (rng.normal(0, 1, (layers, 5, dim)).astype(np.float32), pooled)
    write_store(path, entries, {"kind": "wav2vec2", "layers": list(range(layers)), "encoder": "tiny/test"})
    return path


def test_each_layer_is_a_run_and_the_informative_one_wins(baseline_experiment, tmp_path):
    manifest, split, _ = baseline_experiment
    store = _layered_store(tmp_path / "store", manifest, informative=2)
    out = tmp_path / "probes" / "tiny"
    layers = probe_layers(features=str(store), manifests=[str(manifest)], split=str(split), label_set="four",
                          out=str(out), encoder_name="tiny")

    assert sorted(p.name for p in out.iterdir()) == ["layer_00", "layer_01", "layer_02"]
    protocols = [json.loads((out / f"layer_{k:02d}" / "metrics.json").read_text())["protocol"] for k in range(3)]
    assert [p["probe_layer"] for p in protocols] == [0, 1, 2] and [p["layers"] for p in protocols] == [[0], [1], [2]]
    assert {p["encoder"] for p in protocols} == {"tiny/test"} and protocols[2]["system"] == "probe_tiny_L02"
    assert layers[2]["ua"] > 0.9 and max(layers[0]["ua"], layers[1]["ua"]) < 0.6

    compare([tmp_path / "probes"], tmp_path / "compare", resamples=50)

    table = pd.read_csv(tmp_path / "compare" / "table.csv")
    assert table["probe_layer"].tolist() == [0, 1, 2] and set(table["encoder"]) == {"tiny/test"}
    assert (table["ua_ci_low"] <= table["ua"]).all() and (table["ua"] <= table["ua_ci_high"]).all()
    md = (tmp_path / "compare" / "table.md").read_text()
    assert "| tiny/test | 2 | four | **" in md  # the best layer in bold
    tex = (tmp_path / "compare" / "table.tex").read_text()
    for _, row in table.iterrows():  # the LaTeX export has the probe rows too, with the same figures
        ua = f"{row['ua']:.3f}"
        cell = rf"\textbf{{{ua}}}" if row["probe_layer"] == 2 else ua
        assert f"tiny/test & {int(row['probe_layer'])} & four & {cell} & " in tex
    assert (tmp_path / "compare" / "figures" / "layers.png").read_bytes()[:4] == b"\x89PNG"
    assert "figures/layers.png" in (tmp_path / "compare" / "report.md").read_text()


def test_a_failed_probe_leaves_the_earlier_one(baseline_experiment, tmp_path, capsys):
    manifest, split, _ = baseline_experiment
    store = _layered_store(tmp_path / "store", manifest, informative=1)
    out = tmp_path / "probes" / "tiny"
    args = ["--features", str(store), "--manifest", str(manifest), "--split", str(split), "--out", str(out)]
    assert probe_main([*args, "--label-set", "four"]) == 0
    before = sorted(p.name for p in out.iterdir())
    assert probe_main([*args, "--label-set", "no_such_set"]) == 2
    assert "error:" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == before


def test_a_probe_interrupted_midway_leaves_the_earlier_one_and_nothing_for_compare(baseline_experiment, tmp_path,
                                                                                   monkeypatch):
    import baselines.probe
    from pipeline.compare import expand_run_dirs

    manifest, split, _ = baseline_experiment
    store = _layered_store(tmp_path / "store", manifest, informative=1)
    out = tmp_path / "probes" / "tiny"
    args = ["--features", str(store), "--manifest", str(manifest), "--split", str(split), "--out", str(out),
            "--label-set", "four"]
    assert probe_main(args) == 0
    before = {p.name: (p / "metrics.json").read_bytes() for p in out.iterdir()}
    real, calls = baselines.probe.train_sklearn, []

    def interrupted_at_the_second_layer(**kw):
        calls.append(kw["out"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(**kw)

    monkeypatch.setattr(baselines.probe, "train_sklearn", interrupted_at_the_second_layer)
    with pytest.raises(KeyboardInterrupt):
        baselines.probe.probe_layers(features=str(store), manifests=[str(manifest)], split=str(split),
                                     label_set="four", out=str(out))
    assert {p.name: (p / "metrics.json").read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no half probe beside it
    assert expand_run_dirs([out.parent]) == sorted(out / name for name in before)


def test_a_probe_refuses_an_out_folder_holding_what_it_did_not_write(baseline_experiment, tmp_path, capsys):
    """--out data/probes instead of data/probes/<encoder>: replacing it would delete another encoder's probe."""
    manifest, split, _ = baseline_experiment
    store = _layered_store(tmp_path / "store", manifest, informative=1)
    probes = tmp_path / "probes"
    args = ["--features", str(store), "--manifest", str(manifest), "--split", str(split), "--label-set", "four"]
    assert probe_main([*args, "--out", str(probes / "tiny")]) == 0
    (probes / "NOTES.txt").write_text("mine")
    before = sorted(str(p.relative_to(probes)) for p in probes.rglob("*"))
    assert probe_main([*args, "--out", str(probes)]) != 0
    assert "other entries" in capsys.readouterr().err
    assert sorted(str(p.relative_to(probes)) for p in probes.rglob("*")) == before
