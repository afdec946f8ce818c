"""The comparison stage (pipeline.compare) on synthetic run directories written in the run format."""

from __future__ import annotations

import functools
import json
import re
import shutil
import zlib
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from pipeline.compare import compare, main
from training.rundir import prediction_frame, write_run

FOUR = ["neutral", "happy", "sad", "angry"]
SIX = ["neutral", "happy", "sad", "angry", "fearful", "disgust"]
PNG = b"\x89PNG\r\n\x1a\n"


def utterances(*, corpus: str = "ravdess", speakers: int = 6, per_class: int = 4, labels=FOUR) -> pd.DataFrame:
    """``id, speaker, corpus, true``: every speaker says every label ``per_class`` times."""
    rows = [{"id": f"{corpus}/Actor_{s:02d}/{label}-{k}", "speaker": f"{corpus}_{s:02d}", "corpus": corpus,
             "true": label} for s in range(1, speakers + 1) for label in labels for k in range(per_class)]
    return pd.DataFrame(rows)


def synthetic_run(root: Path, name: str, *, model="rf", feature_set="egemaps", accuracy=0.6, seed=0,
                  scheme="speaker_kfold", labels=FOUR, label_set="four", data=None, folds=3, head=False, layers=0,
                  augmentation=False, **protocol) -> Path:
    """Write a run directory under ``root`` with ``pipeline.metrics.write_run``.

    ``accuracy`` is the chance of a correct prediction, ``head`` adds a history, ``layers`` layer weights and
    ``protocol`` more protocol fields; speakers go to folds round-robin (``random``: utterances do).
    """
    data = utterances(labels=labels) if data is None else data
    rng = np.random.default_rng([zlib.crc32(name.encode()), seed])
    speakers = sorted(data["speaker"].unique())
    if scheme == "random":
        fold = rng.permutation(len(data)) % folds
    else:
        fold = data["speaker"].map({s: i % folds for i, s in enumerate(speakers)}).to_numpy()
    true = data["true"].map(labels.index).to_numpy()
    wrong = (true + rng.integers(1, len(labels), len(data))) % len(labels)
    pred = np.where(rng.random(len(data)) < accuracy, true, wrong)
    proba = np.full((len(data), len(labels)), 0.1 / (len(labels) - 1))
    proba[np.arange(len(data)), pred] = 0.9
    frames = []
    for f in range(folds):
        m = fold == f
        frames.append(prediction_frame(data["id"][m], f, true[m], proba[m], labels))
    history = weights = None
    if head:
        history = pd.DataFrame([{"fold": f, "epoch": e, "train_loss": 1.5 / (e + 1), "val_loss": 1.6 / (e + 1) ** .5,
                                 "val_acc": accuracy * (1 - 0.5 / (e + 1))} for f in range(folds) for e in range(6)])
    if layers:
        raw = rng.random((folds, layers)) + np.linspace(0, 1, layers)
        weights = {"layers": list(range(layers)), "folds": (raw / raw.sum(1, keepdims=True)).tolist()}
    proto = {"system": f"{model}_{feature_set}", "model": model, "feature_set": feature_set,
             "features": "functionals" if feature_set == "egemaps" else "layers 0-12", "split_scheme": scheme,
             "speaker_independent": scheme != "random", "n_folds": folds, "normalisation": "per_speaker",
             "label_set": label_set, "merge_calm": False, "seed": seed, "augmentation": augmentation,
             "corpora": sorted(data["corpus"].unique()), **protocol}
    out = root / "runs" / f"{name}_{seed}"
    write_run(out, labels=labels, predictions=pd.concat(frames, ignore_index=True),
              speakers=data.set_index("id")["speaker"], protocol=proto, history=history, layer_weights=weights)
    return out


@pytest.fixture
def make_run(tmp_path):
    """``make_run(name, **kw)``: :func:`synthetic_run` under the test's temporary directory."""
    return functools.partial(synthetic_run, tmp_path)


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG and matplotlib.image.imread(path).size > 0


def markdown_tables(text: str) -> list[list[list[str]]]:
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_rf_and_head_give_three_parseable_tables_and_real_figures(make_run, tmp_path):
    rf = make_run("rf", accuracy=0.5)
    conv = make_run("conv", model="conv", accuracy=0.8, head=True, layers=13, feature_set="wav2vec2")
    out = tmp_path / "compare"
    table = compare([rf, conv], out, resamples=300)

    csv = pd.read_csv(out / "table.csv")
    assert list(csv.columns[:12]) == ["system", "ua", "wa", "macro_f1", "ua_std", "wa_std", "macro_f1_std",
                                      "ua_ci_low", "ua_ci_high", "n_test", "n_speakers", "p_value"]
    assert list(csv["system"]) == ["rf_egemaps@speaker_kfold", "conv_wav2vec2@speaker_kfold"]
    assert (csv.ua_ci_low <= csv.ua).all() and (csv.ua <= csv.ua_ci_high).all()
    assert csv.loc[0, "p_value"] == 1.0 and 0 < csv.loc[1, "p_value"] < 0.05
    assert (csv.n_test == 96).all() and (csv.n_speakers == 6).all()
    assert table.loc[1, "ua"] == pytest.approx(json.loads((conv / "metrics.json").read_text())["ua"])

    md = markdown_tables((out / "table.md").read_text())
    assert len(md) == 1 and len({len(row) for row in md[0]}) == 1 and len(md[0]) == 2 + 2
    assert "**" in md[0][3][1] and "**" not in md[0][2][1]  # conv has the best UA

    tex = (out / "table.tex").read_text()
    assert tex.count("{") == tex.count("}") and tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    spec = re.search(r"\\begin\{tabular\}\{(\w+)\}", tex).group(1)
    body = tex.split(r"\hline")[1:-1]
    rows = [r for part in body for r in part.split(r"\\") if r.strip()]
    assert len(rows) == 3 and all(r.count("&") == len(spec) - 1 for r in rows)
    assert r"rf\_egemaps" in tex and r"\textbf{" in tex and "95 \\%" in tex

    figures = sorted((out / "figures").glob("*.png"))
    names = {p.name for p in figures}
    assert {"confusion_rf_egemaps_speaker_kfold.png", "curves_conv_wav2vec2_speaker_kfold.png",
            "layer_weights.png", "per_class_f1_four.png"} <= names
    assert "curves_rf_egemaps_speaker_kfold.png" not in names
    assert all(is_png(p) for p in figures)

    report = (out / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert links and all((out / link).is_file() for link in links)
    assert "speaker-independent split `speaker_kfold` with 3 fold(s)" in report

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == set(csv.system) and set(metrics[csv.system[0]]) >= {"ua", "wa", "macro_f1"}
    assert pd.read_csv(out / "plots" / "confusion" / "rf_egemaps_speaker_kfold.csv").columns.tolist() == ["true", "pred"]
    assert pd.read_csv(out / "plots" / "val_acc" / "conv_wav2vec2_speaker_kfold.csv").shape == (6, 2)


def test_seeds_of_one_system_are_one_row_over_all_folds(make_run, tmp_path):
    runs = [make_run("conv", model="conv", seed=s, accuracy=0.5 + 0.1 * s, head=True) for s in range(3)]
    table = compare(runs, tmp_path / "out", formats=["csv"], resamples=200)
    assert len(table) == 1 and table.loc[0, "n_runs"] == 3 and table.loc[0, "seeds"] == "0+1+2"
    fold_ua = [f["ua"] for r in runs for f in json.loads((r / "metrics.json").read_text())["folds"]]
    assert table.loc[0, "ua"] == pytest.approx(np.mean(fold_ua))
    assert table.loc[0, "ua_std"] == pytest.approx(np.std(fold_ua))
    assert table.loc[0, "ua_ci_low"] <= table.loc[0, "ua"] <= table.loc[0, "ua_ci_high"]
    assert table.loc[0, "note"].startswith("no eGeMAPS RandomForest") and np.isnan(table.loc[0, "p_value"])
    assert not (tmp_path / "out" / "table.md").exists()


def test_runs_differing_only_in_cores_used_are_one_system(make_run, tmp_path):
    runs = [make_run("rf_a", seed=0, settings={"n_estimators": 500, "n_jobs": 1}),
            make_run("rf_b", seed=1, settings={"n_estimators": 500, "n_jobs": -1})]
    table = compare(runs, tmp_path / "out", resamples=50)
    assert len(table) == 1
    other = make_run("rf_c", seed=2, settings={"n_estimators": 50, "n_jobs": 1})
    assert len(compare([*runs, other], tmp_path / "out", resamples=50)) == 2


def test_identical_predictions_give_p_one(make_run, tmp_path):
    rf = make_run("rf")
    twin = tmp_path / "twin"
    twin.mkdir()
    for name in ("predictions.csv", "metrics.json"):
        (twin / name).write_bytes((rf / name).read_bytes())
    metrics = json.loads((twin / "metrics.json").read_text())
    metrics["protocol"].update(model="svm", system="svm_egemaps")
    (twin / "metrics.json").write_text(json.dumps(metrics))
    table = compare([rf, twin], tmp_path / "out", resamples=200)
    assert table["p_value"].tolist() == [1.0, 1.0]


def test_label_sets_get_separate_tables_and_are_never_ranked_together(make_run, tmp_path):
    rf4 = make_run("rf4", accuracy=0.7)
    conv6 = make_run("conv6", model="conv", labels=SIX, label_set="six", data=utterances(labels=SIX))
    out = tmp_path / "out"
    table = compare([rf4, conv6], out, resamples=200)
    assert table["label_set"].tolist() == ["four", "six"]
    assert np.isnan(table.loc[1, "p_value"]) and "with this label set" in table.loc[1, "note"]
    md = markdown_tables((out / "table.md").read_text())
    assert [len(t) for t in md] == [3, 3]
    assert not any("**" in cell for t in md for row in t for cell in row)  # one row per table: nothing to rank
    assert (out / "table.tex").read_text().count(r"\begin{tabular}") == 2
    assert "2 label sets" in (out / "report.md").read_text()
    assert is_png(out / "figures" / "per_class_f1_six.png")


def test_same_system_name_with_other_labels_is_disambiguated(make_run, tmp_path):
    a = make_run("a", label_set="four")
    b = make_run("b", labels=SIX, label_set="six", data=utterances(labels=SIX))
    table = compare([a, b], tmp_path / "out", formats=["csv"], resamples=100)
    assert table["system"].tolist() == ["rf_egemaps@speaker_kfold[label_set=four]",
                                        "rf_egemaps@speaker_kfold[label_set=six]"]


def test_different_test_utterances_are_not_paired(make_run, tmp_path):
    rf = make_run("rf", data=utterances(speakers=6))
    conv = make_run("conv", model="conv", data=utterances(speakers=4))
    table = compare([rf, conv], tmp_path / "out", resamples=200)
    assert np.isnan(table.loc[1, "p_value"]) and "test utterances differ" in table.loc[1, "note"]
    assert "test utterances differ" in (tmp_path / "out" / "report.md").read_text()


def test_leakage_audit_puts_random_and_speaker_split_side_by_side(make_run, tmp_path):
    honest = make_run("conv_k", model="conv", feature_set="wav2vec2", accuracy=0.5, head=True)
    leaky = make_run("conv_r", model="conv", feature_set="wav2vec2", accuracy=0.9, scheme="random",
                     head=True)
    rf = make_run("rf")
    out = tmp_path / "out"
    table = compare([honest, leaky, rf], out, resamples=200)
    audit = pd.read_csv(out / "leakage.csv")
    assert len(audit) == 1 and audit.loc[0, "leaky_split"] == "random" and audit.loc[0, "split"] == "speaker_kfold"
    ua = table.set_index("system")["ua"]
    assert audit.loc[0, "ua_diff"] == pytest.approx(ua["conv_wav2vec2@random"] - ua["conv_wav2vec2@speaker_kfold"])
    assert audit.loc[0, "ua_diff"] > 0.2
    # same utterances, but no RF under the random split: a paired test across splits would mix two effects
    row = table.set_index("system").loc["conv_wav2vec2@random"]
    assert np.isnan(row["p_value"]) and "no baseline under the random split" in row["note"]
    assert "Leakage audit" in (out / "report.md").read_text()


def test_cross_corpus_matrix_from_runs_with_train_corpora(make_run, tmp_path):
    both = pd.concat([utterances(corpus="ravdess"), utterances(corpus="cremad")], ignore_index=True)
    within = make_run("within", data=utterances(corpus="ravdess"), accuracy=0.9, label_set="common")
    # fold 0 trains on ravdess and tests on cremad; fold 1 the other way round
    cross_data = both.assign(speaker=both["corpus"])
    across = make_run("across", data=cross_data, folds=2, accuracy=0.5, scheme="corpus_holdout",
                      label_set="common", train_corpora={"0": ["ravdess"], "1": ["cremad"]})
    out = tmp_path / "out"
    compare([within, across], out, resamples=100)
    cross = pd.read_csv(out / "cross_corpus.csv")
    cells = cross.set_index(["train", "test"])["ua"]
    assert set(cells.index) == {("ravdess", "ravdess"), ("ravdess", "cremad"), ("cremad", "ravdess")}
    assert cells["ravdess", "ravdess"] > cells["ravdess", "cremad"]
    assert "| train \\ test |" in (out / "report.md").read_text()


def test_one_corpus_gives_an_empty_cross_corpus_file_and_no_leakage_rows(make_run, tmp_path):
    out = tmp_path / "out"
    compare([make_run("rf")], out, resamples=100)
    assert pd.read_csv(out / "cross_corpus.csv").empty and pd.read_csv(out / "leakage.csv").empty
    assert "Only one corpus" in (out / "report.md").read_text()


def test_a_run_whose_metrics_disagree_with_its_predictions_is_named(make_run, tmp_path):
    rf = make_run("rf")
    metrics = json.loads((rf / "metrics.json").read_text())
    metrics["ua"] += 0.1
    (rf / "metrics.json").write_text(json.dumps(metrics))
    compare([rf], tmp_path / "out", resamples=100)
    assert "metrics.json says ua" in (tmp_path / "out" / "report.md").read_text()


def test_cli_writes_the_chosen_formats_and_clears_stale_figures(make_run, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "confusion_gone.png").write_bytes(PNG)
    main([str(make_run("rf")), "--out", str(out), "--format", "md,latex", "--resamples", "100"])
    assert (out / "table.md").is_file() and (out / "table.tex").is_file() and not (out / "table.csv").exists()
    assert not (out / "figures" / "confusion_gone.png").exists()
    assert "rf_egemaps@speaker_kfold" in capsys.readouterr().out


def test_a_failed_comparison_leaves_the_previous_one_and_keeps_the_users_files(make_run, tmp_path, monkeypatch):
    import evaluation.report

    out = tmp_path / "out"
    compare([make_run("rf")], out, resamples=50)
    (out / "NOTES.md").write_text("mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = evaluation.report.write_report

    def killed_after_the_tables(*args, **kw):  # table.csv and the figures are written by now, report.md not
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation.report, "write_report", killed_after_the_tables)
    with pytest.raises(KeyboardInterrupt):
        compare([make_run("rf"), make_run("svm", model="svm")], out, resamples=50)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == []
    monkeypatch.setattr(evaluation.report, "write_report", real)
    compare([make_run("rf"), make_run("svm", model="svm")], out, resamples=50)
    assert (out / "NOTES.md").read_text() == "mine" and "svm_egemaps" in (out / "table.csv").read_text()
    with pytest.raises(ValueError, match="would delete"):  # --out data/runs for the runs in it
        compare([make_run("rf")], tmp_path / "runs", resamples=50)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"formats": ["html"]}, ValueError, "formats among"),
    ({"baseline": "nope"}, ValueError, "names no system"),
])
def test_bad_arguments_are_refused(make_run, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        compare([make_run("rf")], tmp_path / "out", resamples=10, **kwargs)


def test_missing_or_malformed_run_directories_are_refused(make_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a run directory"):
        compare([tmp_path / "nowhere"], tmp_path / "out")
    rf = make_run("rf")
    pd.read_csv(rf / "predictions.csv").drop(columns="pred").to_csv(rf / "predictions.csv", index=False)
    with pytest.raises(ValueError, match="lacks columns"):
        compare([rf], tmp_path / "out")
    with pytest.raises(ValueError, match="more than once"):
        compare([make_run("x"), make_run("x")], tmp_path / "out")


def test_staging_folders_and_broken_runs_are_skipped_and_reported_not_averaged_in(tmp_path, capsys):
    import shutil

    from pipeline.compare import expand_run_dirs

    runs = tmp_path / "runs"
    rf, conv = synthetic_run(runs, "rf_0"), synthetic_run(runs, "conv_0", model="conv")
    shutil.copytree(rf, runs / ".rf_0.old-999999")  # what a kill between a trainer's two renames leaves
    shutil.copytree(conv, runs / ".conv_0.tmp-999998")  # a staging folder of a run being written
    shutil.copytree(rf, tmp_path / "runs" / "enc.tmp" / "layer_00")  # a probe's unfinished output
    broken = shutil.copytree(rf, runs / "svm_0")
    (broken / "metrics.json").unlink()  # damaged or cut short
    assert expand_run_dirs([runs]) == sorted([rf, conv])
    said = capsys.readouterr().err
    for folder in (".rf_0.old-999999", ".conv_0.tmp-999998", "enc.tmp/layer_00"):
        assert f"skipped {runs / folder}: a run being written or replaced" in said
    assert f"skipped {broken}: a run directory without metrics.json" in said
    compare([runs], tmp_path / "out", resamples=20, formats=["md"])  # the report counts them too
    notes = (tmp_path / "out" / "report.md").read_text().split("## Notes", 1)[1]
    assert f"skipped {broken}: a run directory without metrics.json" in notes
    assert sum(line.startswith("- skipped ") for line in notes.splitlines()) == 4


def test_a_run_linked_into_a_runs_folder_is_found_and_a_second_link_to_it_is_reported(tmp_path, capsys):
    from pipeline.compare import expand_run_dirs

    elsewhere = synthetic_run(tmp_path / "elsewhere", "conv_0", model="conv")
    runs = tmp_path / "runs"
    rf = synthetic_run(runs, "rf_0")
    (runs / "runs" / "a_link").symlink_to(elsewhere, target_is_directory=True)
    (runs / "runs" / "b_link").symlink_to(elsewhere, target_is_directory=True)
    (runs / "runs" / "loop").symlink_to(runs, target_is_directory=True)  # back to an ancestor
    assert expand_run_dirs([runs]) == [runs / "runs" / "a_link", rf]
    said = capsys.readouterr().err
    assert f"skipped {runs / 'runs' / 'b_link'}: the same folder as {runs / 'runs' / 'a_link'}" in said
    assert expand_run_dirs([runs, elsewhere.parent]) == [runs / "runs" / "a_link", rf]  # a link into another folder
    assert f"skipped {elsewhere}: the same run as {runs / 'runs' / 'a_link'}" in capsys.readouterr().err


def test_no_paired_test_against_a_baseline_of_other_labels_or_another_split(tmp_path):
    rf = synthetic_run(tmp_path / "runs", "rf_0")
    relabelled = utterances()
    relabelled.loc[:5, "true"] = relabelled.loc[:5, "true"].map({"angry": "happy", "happy": "angry",
                                                                "neutral": "sad", "sad": "neutral"})
    svm = synthetic_run(tmp_path / "runs", "svm_0", model="svm", data=relabelled)
    conv = synthetic_run(tmp_path / "runs", "conv_0", model="conv", folds=2)
    lin = synthetic_run(tmp_path / "runs", "linear_0", model="linear")
    table = compare([rf, svm, conv, lin], tmp_path / "out", resamples=100).set_index("model")
    assert np.isnan(table.loc["svm", "p_value"])
    assert table.loc["svm", "note"].startswith("another ground truth for 6 test utterances")
    assert np.isnan(table.loc["conv", "p_value"])
    assert table.loc["conv", "note"].startswith("another assignment of utterances to folds (another split)")
    assert 0 <= table.loc["linear", "p_value"] <= 1 and table.loc["linear", "note"] == ""  # alike: tested


def test_a_system_whose_runs_differ_in_split_says_so(tmp_path):
    first = synthetic_run(tmp_path / "runs", "rf_0", scheme="random")
    second = synthetic_run(tmp_path / "other", "rf_1", scheme="random")  # same seed, another random split
    compare([first, second], tmp_path / "out", resamples=100)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "its runs differ in their split (the assignment of utterances to folds), not only in their seed" in report


def test_runs_differing_in_recorded_settings_are_two_systems_named_by_the_difference(tmp_path):
    small = synthetic_run(tmp_path / "a", "conv", model="conv", feature_set="wav2vec2", accuracy=0.3,
                          settings={"hidden": 8, "lr": 1e-4, "dropout": 0.2})
    big = synthetic_run(tmp_path / "b", "conv", model="conv", feature_set="wav2vec2", accuracy=0.9,
                        settings={"hidden": 64, "lr": 1e-2, "dropout": 0.2})
    table = compare([small, big], tmp_path / "out", resamples=50, formats=["csv"])
    assert table["system"].tolist() == ["conv_wav2vec2@speaker_kfold[hidden=8,lr=0.0001]",
                                        "conv_wav2vec2@speaker_kfold[hidden=64,lr=0.01]"]
    assert table["n_runs"].tolist() == [1, 1]


def test_one_seed_on_one_split_twice_is_refused_not_counted_twice(tmp_path):
    first = synthetic_run(tmp_path / "a", "conv", model="conv", feature_set="wav2vec2")
    copy = tmp_path / "b" / "conv_copy"
    shutil.copytree(first, copy)
    with pytest.raises(ValueError, match="same configuration, seed 0 and split"):
        compare([first, copy], tmp_path / "out", resamples=50, formats=["csv"])
    other_seed = synthetic_run(tmp_path / "c", "conv", model="conv", feature_set="wav2vec2", seed=1)
    assert compare([first, other_seed], tmp_path / "out", resamples=50, formats=["csv"])["n_runs"].tolist() == [2]


def test_the_paired_test_checks_every_run_of_both_systems_in_any_order(tmp_path):
    def run(model, name, seed):  # the split of a random scheme follows the name and seed
        return synthetic_run(tmp_path / model / str(seed), name, model=model, seed=seed, scheme="random",
                             accuracy={"rf": 0.5, "svm": 0.8, "linear": 0.7}[model])
    rf = [run("rf", "x", 0), run("rf", "x", 1)]
    svm = [run("svm", "x", 1), run("svm", "x", 0)]  # the same two splits, listed the other way round
    linear = [run("linear", "x", 0), run("linear", "z", 1)]  # its second split is one rf never used
    table = compare([*rf, *svm, *linear], tmp_path / "out", resamples=50, formats=["csv"]).set_index("system")
    assert table.loc["svm_egemaps@random", "note"] == "" and table.loc["svm_egemaps@random", "p_value"] < 0.05
    assert np.isnan(table.loc["linear_egemaps@random", "p_value"])
    assert "another assignment of utterances to folds" in table.loc["linear_egemaps@random", "note"]


def test_a_named_baseline_is_the_reference_of_the_p_values_and_of_every_caption(tmp_path):
    runs = [synthetic_run(tmp_path, "rf", accuracy=0.5),
            synthetic_run(tmp_path, "conv", model="conv", feature_set="wav2vec2", accuracy=0.8),
            synthetic_run(tmp_path, "linear", model="linear", feature_set="wav2vec2", accuracy=0.7)]
    assert main([*map(str, runs), "--out", str(tmp_path / "out"), "--resamples", "100",
                 "--baseline", "conv_wav2vec2@speaker_kfold"]) == 0
    table = pd.read_csv(tmp_path / "out" / "table.csv").set_index("system")
    assert (table["baseline"] == "conv_wav2vec2@speaker_kfold").all()
    assert table.loc["rf_egemaps@speaker_kfold", "p_value"] < 0.05  # 0.5 against 0.8 on 96 utterances
    for name in ("table.md", "table.tex", "report.md"):
        text = (tmp_path / "out" / name).read_text().replace("\\_", "_")
        assert "against the system conv_wav2vec2@speaker_kfold" in text and "RandomForest" not in text, name
    assert main([*map(str, runs), "--out", str(tmp_path / "out2"), "--baseline", "nothing"]) == 1


def test_names_alike_once_made_safe_keep_their_own_figures_and_metrics(tmp_path):
    good = synthetic_run(tmp_path / "a", "conv", model="conv", accuracy=0.9, system="conv_lr0.01")
    bad = synthetic_run(tmp_path / "b", "conv", model="conv", accuracy=0.3, system="conv_lr0_01")
    table = compare([good, bad], tmp_path / "out", resamples=50).set_index("system")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert sorted(m["ua"] for m in metrics.values()) == sorted(table["ua"])  # both kept, under two keys
    confusion = sorted((tmp_path / "out" / "plots" / "confusion").glob("*.csv"))
    assert [p.name for p in confusion] == ["conv_lr0_01_speaker_kfold.csv", "conv_lr0_01_speaker_kfold_2.csv"]
    assert len(list((tmp_path / "out" / "figures").glob("confusion_*.png"))) == 2
    report = (tmp_path / "out" / "report.md").read_text()
    assert "confusion_conv_lr0_01_speaker_kfold_2.png" in report


def test_layer_weights_of_heads_over_other_layers_are_drawn_at_their_own_layers(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    every = synthetic_run(tmp_path, "conv_all", model="conv", feature_set="wav2vec2", head=True, layers=4,
                          system="conv_all")
    subset = synthetic_run(tmp_path, "conv_sub", model="conv", feature_set="wav2vec2", head=True, layers=2,
                           system="conv_sub")
    weights = json.loads((subset / "layer_weights.json").read_text())
    (subset / "layer_weights.json").write_text(json.dumps({**weights, "layers": [3, 2]}))  # --layers 3 2
    drawn = {}
    save = Figure.savefig

    def keep(fig, path, **kw):
        if Path(path).name == "layer_weights.png":
            ax = fig.axes[0]
            drawn["ticks"] = [t.get_text() for t in ax.get_xticklabels()]
            drawn["lines"] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                              for line in ax.get_lines()}
        return save(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", keep)
    compare([every, subset], tmp_path / "out", resamples=20, formats=["md"])
    assert drawn["ticks"] == ["0", "1", "2", "3"]
    assert drawn["lines"]["conv_all@speaker_kfold"][0] == [0, 1, 2, 3]
    xs, ys = drawn["lines"]["conv_sub@speaker_kfold"]
    assert xs == [2, 3] and ys == pytest.approx(np.mean(weights["folds"], axis=0)[::-1])  # sorted, not zigzag
    uniform = sorted(y[0] for label, (_, y) in drawn["lines"].items() if label.startswith("_"))
    assert uniform == [0.25, 0.5]  # each head's own uniform weight, not the last one's for all


def test_latex_table_escapes_every_special_character_of_a_system_name(tmp_path):
    run = synthetic_run(tmp_path, "odd", system=r"rf_a|b&c%d#e$f{g}h~i^j\k<l>m")
    compare([run], tmp_path / "out", resamples=20, formats=["latex"])
    tex = (tmp_path / "out" / "table.tex").read_text()
    assert (r"rf\_a\textbar{}b\&c\%d\#e\$f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k"
            r"\textless{}l\textgreater{}m" in tex)


def test_a_run_without_recorded_settings_beside_one_with_is_named_briefly(tmp_path):
    old = synthetic_run(tmp_path / "a", "conv", model="conv")
    new = synthetic_run(tmp_path / "b", "conv", model="conv", settings={"hidden": 8, "lr": 1e-3})
    table = compare([old, new], tmp_path / "out", resamples=20, formats=["csv"])
    assert table["system"].tolist() == ["conv_egemaps@speaker_kfold[settings=none]",
                                        "conv_egemaps@speaker_kfold[settings=recorded]"]
