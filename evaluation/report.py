"""Writers of the comparison stage: tables (Markdown, CSV, LaTeX), ``metrics.json``, plot data, PNGs, ``report.md``.

Figures are drawn with matplotlib's object API (``matplotlib.figure.Figure``, Agg canvas), so no global
backend is switched and nothing needs a display. Every table is written per label set; a label set's best
``ua``, ``wa`` and ``macro_f1`` (at the printed precision) are bold.

Example:
    >>> markdown_table(table)                     # doctest: +SKIP
    '| System | UA | WA | ...'
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import f1_score

from evaluation.results import Result
from evaluation.systems import file_slug

BEST = ("ua", "wa", "macro_f1")
HEADER = ["System", "UA", "WA", "Macro-F1", "UA 95 % CI", "Test utt.", "Speakers", "p vs. baseline"]
#: Figures per system in metrics.json (for ``dvc metrics show/diff``); the full table is table.csv.
METRICS = ("ua", "wa", "macro_f1", "ua_ci_low", "ua_ci_high", "p_value")
PLOT_DIRS = ("confusion", "train_loss", "val_loss", "val_acc")
_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
          "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
          "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}", "±": r"$\pm$"}


def fmt(value: float, digits: int = 3) -> str:
    """A figure at the table's precision, empty for NaN/None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}"


def fmt_p(value: float) -> str:
    """A p-value: three decimals, ``<0.001`` below, empty when not tested."""
    if value is None or math.isnan(value):
        return ""
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters."""
    return "".join(_LATEX.get(c, c) for c in str(text))


def _cells(table: pd.DataFrame, *, bold, escape=str, pm: str = "±") -> list[list[str]]:
    # Speaker-dependent rows are not ranked: leakage would make them "best" (see the leakage audit).
    independent = [v is None or v != v or bool(v) for v in table["speaker_independent"]]  # unknown counts
    ranked = table[independent]
    best = {k: max(fmt(v) for v in ranked[k]) if len(ranked) > 1 else None for k in BEST}
    rows = []
    for flag, (_, r) in zip(independent, table.iterrows(), strict=True):
        cells = [escape(r["system"])]
        for key in BEST:
            text = f"{fmt(r[key])} {pm} {fmt(r[key + '_std'])}"
            top = flag and fmt(r[key]) == best[key]
            cells.append(bold(text) if top else text)
        cells += [f"[{fmt(r['ua_ci_low'])}, {fmt(r['ua_ci_high'])}]", str(int(r["n_test"])),
                  str(int(r["n_speakers"])), escape(fmt_p(r["p_value"]))]
        rows.append(cells)
    return rows


def markdown_table(table: pd.DataFrame) -> str:
    """One label set's rows as a Markdown table (best per metric in bold)."""
    rows = _cells(table, bold=lambda t: f"**{t}**")
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|"]
    for cells in rows:
        cells[0] = f"`{cells[0]}`"
        lines.append("| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def latex_table(table: pd.DataFrame, caption: str) -> str:
    """One label set's rows as a LaTeX ``table`` with a ``tabular`` (best per metric in ``\\textbf``)."""
    rows = _cells(table, bold=lambda t: r"\textbf{" + t + "}", escape=latex_escape, pm=r"$\pm$")
    lines = [r"\begin{table}[ht]", r"\centering", r"\caption{" + latex_escape(caption) + "}",
             r"\begin{tabular}{l" + "r" * (len(HEADER) - 1) + "}", r"\hline",
             " & ".join(latex_escape(h) for h in HEADER) + r" \\", r"\hline"]
    lines += [" & ".join(cells) + r" \\" for cells in rows]
    lines += [r"\hline", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


#: The reference of the p-values unless ``--baseline`` names another system.
DEFAULT_BASELINE = "the eGeMAPS RandomForest"


def baseline_words(baseline: str | None) -> str:
    """The reference of the p-values, in words: the system ``--baseline`` named, or the default."""
    return f"the system {baseline}" if baseline else DEFAULT_BASELINE


def caption(group: str, labels: Sequence[str], resamples: int, baseline: str | None = None) -> str:
    """The caption shared by the Markdown and LaTeX tables of one label set."""
    return (f"Label set {group} ({len(labels)} classes: {', '.join(labels)}). UA, WA, macro-F1: mean ± "
            f"population std over folds (and seeds); UA 95 % CI: bootstrap over test utterances stratified by "
            f"class and fold ({resamples} resamples); p: two-sided paired permutation test of UA against "
            f"{baseline_words(baseline)}{'' if baseline else ' of the same split'} (table.csv: baseline). Bold: "
            "best speaker-independent system; rows under a speaker-dependent split (@random) are not ranked.")


def write_all(out: Path, results: list[Result], table: pd.DataFrame, leakage: pd.DataFrame, cross: pd.DataFrame, *,
              formats: Sequence[str], resamples: int, seed: int, baseline: str | None = None,
              skipped: Sequence[str] = ()) -> None:
    """Write every output of the comparison into the fresh folder ``out`` (see ``pipeline.compare``);
    ``baseline``: the system ``--baseline`` named as the p-values' reference (None: the eGeMAPS RandomForest);
    ``skipped``: the folders left out and why, listed among the report's notes."""
    for sub in ("figures", *(f"plots/{d}" for d in PLOT_DIRS)):  # a fresh folder: pipeline.compare stages it
        (out / sub).mkdir(parents=True, exist_ok=True)
    labels = {r.system.label_group: r.system.labels for r in results}
    if "csv" in formats:
        table.to_csv(out / "table.csv", index=False)  # every row, the per-layer probes' included
    full, probes = table, probe_table(table)
    table = table[table["probe_layer"].isna()] if "probe_layer" in table else table
    results = [r for r in results if "probe_layer" not in r.system.protocol]  # probes: their own table, figure
    groups = list(dict.fromkeys(table["label_set"]))
    if "md" in formats:
        parts = [f"{caption(g, labels[g], resamples, baseline)}\n\n" + markdown_table(table[table.label_set == g])
                 for g in groups]
        if len(probes):
            parts.append(probe_caption(baseline) + "\n\n" + probe_markdown(probes))
        (out / "table.md").write_text("\n".join(parts))
    if "latex" in formats:
        parts = [latex_table(table[table.label_set == g], caption(g, labels[g], resamples, baseline))
                 for g in groups]
        if len(probes):
            parts.append(probe_latex(probes, baseline))
        (out / "table.tex").write_text("\n".join(parts))
    keys = unique(list(full["system"]), _key)
    metrics = {keys[r["system"]]: {k: _num(r[k]) for k in METRICS} for _, r in full.iterrows()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    leakage.to_csv(out / "leakage.csv", index=False)
    cross.to_csv(out / "cross_corpus.csv", index=False)
    figures = {}
    slugs = unique([r.system.name for r in results], file_slug)
    for result in results:
        figures[result.system.name] = write_system_plots(out, result, slugs[result.system.name])
    group_slugs = unique(groups, _slug)
    shared = {g: per_class_f1_plot(out / "figures" / f"per_class_f1_{group_slugs[g]}.png",
                                   [r for r in results if r.system.label_group == g]) for g in groups}
    weights = layer_weights_plot(out / "figures" / "layer_weights.png", results)
    layers = layer_analysis_plot(out / "figures" / "layers.png", probes, results) if len(probes) else None
    write_report(out, results, table, leakage, cross, figures, shared, weights,
                 formats=formats, resamples=resamples, seed=seed, probes=probes, layers=layers, baseline=baseline,
                 skipped=skipped)


def write_system_plots(out: Path, result: Result, slug: str) -> dict[str, str]:
    """A system's confusion PNG, curves PNG (heads) and DVC plot data, in files named by ``slug`` (unique among
    the systems: see :func:`unique`); returns ``{kind: relative path}``."""
    system = result.system
    pooled = pd.concat([run.predictions[["true", "pred"]] for run in system.runs], ignore_index=True)
    pooled.to_csv(out / "plots" / "confusion" / f"{slug}.csv", index=False)
    paths = {"confusion": f"figures/confusion_{slug}.png"}
    confusion_plot(out / paths["confusion"], pooled, system.labels, system.name)
    histories = [run.history.assign(run=i) for i, run in enumerate(system.runs) if run.history is not None]
    if histories:
        history = pd.concat(histories, ignore_index=True)
        mean = history.groupby("epoch", sort=True)[["train_loss", "val_loss", "val_acc"]].mean().reset_index()
        for column in ("train_loss", "val_loss", "val_acc"):
            mean[["epoch", column]].to_csv(out / "plots" / column / f"{slug}.csv", index=False)
        paths["curves"] = f"figures/curves_{slug}.png"
        curves_plot(out / paths["curves"], history, system.name)
    return paths


def confusion_plot(path: Path, pooled: pd.DataFrame, labels: Sequence[str], title: str) -> None:
    """Heatmap of the confusion matrix normalised by true class, rows true and columns predicted."""
    counts = pd.crosstab(pooled["true"], pooled["pred"]).reindex(index=labels, columns=labels, fill_value=0)
    totals = counts.sum(axis=1).to_numpy()[:, None]
    share = np.divide(counts.to_numpy(), totals, out=np.zeros(counts.shape), where=totals > 0)
    k = len(labels)
    fig = Figure(figsize=(1.6 + 0.75 * k, 1.4 + 0.65 * k), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\nshare of each true class ({len(pooled)} predictions)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=110)


def curves_plot(path: Path, history: pd.DataFrame, title: str) -> None:
    """Train/val loss and validation accuracy per epoch: each fold thin, the mean over folds bold."""
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    loss, acc = fig.subplots(1, 2)
    for _, fold in history.groupby(["run", "fold", "member"] if "member" in history else ["run", "fold"]):
        loss.plot(fold["epoch"], fold["train_loss"], color="C0", alpha=0.25, lw=0.8)
        loss.plot(fold["epoch"], fold["val_loss"], color="C1", alpha=0.25, lw=0.8)
        acc.plot(fold["epoch"], fold["val_acc"], color="C2", alpha=0.25, lw=0.8)
    mean = history.groupby("epoch", sort=True)[["train_loss", "val_loss", "val_acc"]].mean()
    loss.plot(mean.index, mean["train_loss"], color="C0", lw=2, label="train loss (mean)")
    loss.plot(mean.index, mean["val_loss"], color="C1", lw=2, label="val loss (mean)")
    acc.plot(mean.index, mean["val_acc"], color="C2", lw=2, label="val accuracy (mean)")
    for ax, label in ((loss, "loss"), (acc, "validation accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title} (thin: folds; bold: mean of the folds still training)", fontsize=10)
    fig.savefig(path, dpi=110)


def per_class_f1_plot(path: Path, results: list[Result]) -> str:
    """Grouped bars of per-class F1 (pooled predictions) of the systems of one label set."""
    labels = results[0].system.labels
    width = 0.8 / len(results)
    fig = Figure(figsize=(max(6.0, 0.35 * len(labels) * len(results) + 3), 3.8), layout="constrained")
    ax = fig.add_subplot()
    for k, result in enumerate(results):
        pooled = pd.concat([run.predictions for run in result.system.runs])
        f1 = f1_score(pooled["true"], pooled["pred"], labels=labels, average=None, zero_division=0)
        ax.bar(np.arange(len(labels)) + (k - (len(results) - 1) / 2) * width, f1, width, label=result.system.name)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("F1 (pooled over folds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"Per-class F1 — label set {results[0].system.label_group}", fontsize=10)
    fig.savefig(path, dpi=110)
    return f"figures/{path.name}"


def probe_caption(baseline: str | None = None) -> str:
    """The per-layer probe table's caption."""
    return ("Per-layer probe: UA of a logistic regression on each layer's pooled mean ‖ std, same folds as the "
            f"systems (95 % CI: bootstrap over test utterances; p against {baseline_words(baseline)}).")


def probe_table(table: pd.DataFrame) -> pd.DataFrame:
    """The per-layer probe rows (``probe_layer`` set), ordered by label set, encoder and layer."""
    if "probe_layer" not in table:
        return table.iloc[:0]
    probes = table[table["probe_layer"].notna()]
    return probes.sort_values(["label_set", "encoder", "probe_layer"], kind="stable")


PROBE_HEADER = ["Encoder", "Layer", "Label set", "UA", "UA 95 % CI", "Test utt.", "p vs. baseline"]


def _probe_cells(probes: pd.DataFrame, *, bold: Callable[[str], str], escape: Callable[[str], str]) -> list[list[str]]:
    """The probe rows' cells: one row per (label set, encoder, layer), the best layer's UA in ``bold``."""
    best = probes.groupby(["label_set", "encoder"])["ua"].transform("max")
    rows = []
    for (_, r), top in zip(probes.iterrows(), probes["ua"] == best, strict=True):
        rows.append([escape(str(r["encoder"] or r["features"])), str(int(r["probe_layer"])), escape(str(r["label_set"])),
                     bold(fmt(r["ua"])) if top else fmt(r["ua"]), f"[{fmt(r['ua_ci_low'])}, {fmt(r['ua_ci_high'])}]",
                     str(int(r["n_test"])), fmt_p(r["p_value"])])
    return rows


def probe_markdown(probes: pd.DataFrame) -> str:
    """The probe rows as a Markdown table: one row per (label set, encoder, layer), the best layer in bold."""
    lines = ["| " + " | ".join(PROBE_HEADER) + " |", "|---|---:|---|---:|---|---:|---:|"]
    lines += ["| " + " | ".join(cells) + " |"
              for cells in _probe_cells(probes, bold=lambda t: f"**{t}**", escape=lambda t: t)]
    return "\n".join(lines) + "\n"


def probe_latex(probes: pd.DataFrame, baseline: str | None = None) -> str:
    """The probe rows as a LaTeX ``table`` (the best layer per encoder in ``\\textbf``), as in ``table.md``."""
    lines = [r"\begin{table}[ht]", r"\centering", r"\caption{" + latex_escape(probe_caption(baseline)) + "}",
             r"\begin{tabular}{lrlrlrr}", r"\hline", " & ".join(latex_escape(h) for h in PROBE_HEADER) + r" \\",
             r"\hline"]
    lines += [" & ".join(cells) + r" \\"
              for cells in _probe_cells(probes, bold=lambda t: r"\textbf{" + t + "}", escape=latex_escape)]
    lines += [r"\hline", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def layer_analysis_plot(path: Path, probes: pd.DataFrame, results: list[Result]) -> str:
    """Which layer carries emotion: probe UA against layer, one line per encoder (band: 95 % CI), beside the
    heads' learned layer weights (mean over folds)."""
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    for (encoder, group), sub in probes.groupby(["encoder", "label_set"], sort=False):
        (line,) = left.plot(sub["probe_layer"], sub["ua"], marker="o", label=f"{encoder} ({group})")
        left.fill_between(sub["probe_layer"], sub["ua_ci_low"], sub["ua_ci_high"], color=line.get_color(),
                          alpha=0.2)
    left.set_xlabel("encoder layer (hidden state)")
    left.set_ylabel("UA of the layer's probe")
    left.set_title("Per-layer probe (band: 95 % CI)", fontsize=10)
    left.legend(fontsize=7)
    for result in results:
        weights = [run.layer_weights for run in result.system.runs if run.layer_weights]
        if weights:
            folds = np.array([f for w in weights for f in w["folds"]], dtype=float)
            right.plot(weights[0]["layers"], folds.mean(axis=0), marker="o", label=result.system.name)
    right.set_xlabel("encoder layer (position in the store)")
    right.set_ylabel("softmax weight")
    right.set_title("Heads' learned layer weights (mean over folds)", fontsize=10)
    if right.lines:
        right.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return f"figures/{path.name}"


def layer_weights_plot(path: Path, results: list[Result]) -> str | None:
    """Learned softmax layer weights of the heads that have them: mean over folds, band over folds."""
    with_weights = [(r, [run.layer_weights for run in r.system.runs if run.layer_weights]) for r in results]
    with_weights = [(r, w) for r, w in with_weights if w]
    if not with_weights:
        return None
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.add_subplot()
    # every system at its own layers' places on one axis of all the layers drawn (heads may use other subsets)
    every = sorted({x for _, weights in with_weights for x in weights[0]["layers"]},
                   key=lambda x: (not isinstance(x, int | float), x if isinstance(x, int | float) else str(x)))
    place = {x: i for i, x in enumerate(every)}
    counts = {len(weights[0]["layers"]) for _, weights in with_weights}
    for result, weights in with_weights:
        order = np.argsort([place[x] for x in weights[0]["layers"]], kind="stable")  # a head's order: --layers 12,0
        xs = [place[weights[0]["layers"][i]] for i in order]
        folds = np.array([f for w in weights for f in w["folds"]], dtype=float)[:, order]
        (line,) = ax.plot(xs, folds.mean(axis=0), marker="o", label=result.system.name)
        ax.fill_between(xs, folds.min(axis=0), folds.max(axis=0), color=line.get_color(), alpha=0.2)
        if len(counts) > 1:  # uniform differs between heads of other layer counts: each its own
            ax.plot([min(xs), max(xs)], [1 / len(xs)] * 2, color=line.get_color(), ls=":", lw=1)
    ax.set_xticks(range(len(every)), [str(x) for x in every])
    if len(counts) == 1:
        ax.axhline(1 / counts.pop(), color="grey", ls=":", lw=1, label="uniform")
    ax.set_xlabel("encoder layer")
    ax.set_ylabel("softmax weight")
    ax.set_title("Learned layer weights (line: mean over folds; band: min–max)", fontsize=10)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return f"figures/{path.name}"


def protocol_words(result: Result) -> str:
    """A system's protocol in a sentence or two."""
    p, s = result.system.protocol, result.system
    independent = p.get("speaker_independent")
    split = {True: "speaker-independent", False: "speaker-dependent (speakers shared between train and test)",
             None: "speaker independence not recorded"}[None if independent is None else bool(independent)]
    merge = "calm merged into neutral" if p.get("merge_calm") else "calm kept apart"
    seeds = ", ".join(map(str, s.seeds))
    return (f"`{s.name}`: {p.get('model', '?')} on {p.get('feature_set', '?')} features"
            f"{' (' + _plain(p['features']) + ')' if p.get('features') else ''}; {split} split "
            f"`{p.get('split_scheme')}` with {p.get('n_folds', '?')} fold(s); normalisation "
            f"{_plain(p.get('normalisation', 'not recorded'))}; label set {s.label_group} "
            f"({len(s.labels)} classes: {', '.join(s.labels)}; {merge}); training data "
            f"{_augmentation_words(p.get('augmentation')) if result.row['augmentation'] else 'not augmented'}"
            f"; corpora {_plain(p.get('corpora', '?'))}; {len(s.runs)} run(s), seed(s) {seeds}.")


def write_report(out: Path, results: list[Result], table: pd.DataFrame, leakage: pd.DataFrame, cross: pd.DataFrame,
                 figures: dict, shared: dict, weights: str | None, *, formats: Sequence[str], resamples: int,
                 seed: int, probes: pd.DataFrame | None = None, layers: str | None = None,
                 baseline: str | None = None, skipped: Sequence[str] = ()) -> None:
    """``report.md``: tables, protocols in words, leakage audit, cross-corpus matrix, figures, notes."""
    files = {"md": "table.md", "csv": "table.csv", "latex": "table.tex"}
    lines = ["# Comparison", "",
             f"{len(table)} system(s) from {sum(len(r.system.runs) for r in results)} run(s). Tables: "
             + ", ".join(f"[{files[f]}]({files[f]})" for f in formats) + "; metrics for DVC: "
             "[metrics.json](metrics.json). Every figure is recomputed from the runs' `predictions.csv`.", "",
             "UA is the mean per-class recall (classes present in a fold's test set), WA plain accuracy, "
             "macro-F1 the mean F1 of the labels present; each is the mean over folds (and seeds) ± the "
             "population std. The 95 % CI of UA is a percentile bootstrap of that same fold-mean UA over test "
             f"utterances, resampled within class × fold strata ({resamples} resamples, seed {seed}); an "
             "utterance keeps all its seeds' predictions. p is a two-sided paired permutation test of the UA "
             f"difference against {baseline_words(baseline)} tested on exactly the same utterances (predictions "
             f"swapped per utterance, {resamples} swaps; the smallest possible p is {1 / (resamples + 1):.4f}), "
             "one test per system and not corrected for multiple comparisons.", ""]
    groups = list(dict.fromkeys(table["label_set"]))
    if len(groups) > 1:
        lines += [f"**These runs use {len(groups)} label sets; scores are comparable only within one table.**", ""]
    for group in groups:
        sub = table[table.label_set == group]
        lines += [f"## Label set {group}", "", markdown_table(sub)]
        untested = sub[sub["p_value"].isna()]
        lines += [f"- `{r.system}`: p not computed: {r.note}." for r in untested.itertuples()]
        lines += [f"- Per-class F1: ![per-class F1]({shared[group]})", ""]
    if probes is not None and len(probes):
        lines += ["## Which layer carries emotion", "", probe_caption(baseline), "", f"![UA per layer]({layers})", "",
                  probe_markdown(probes)]
    lines += ["## Protocols", ""] + [f"- {protocol_words(r)}" for r in results] + [""]
    lines += ["## Leakage audit (speaker-dependent `random` split vs. speaker-independent split)", ""]
    if leakage.empty:
        lines += ["No system was run under both a `random` and a speaker-independent split; run the same "
                  "system with `split.scheme: random` to see how much speaker leakage inflates its scores.", ""]
    else:
        lines += ["| System | Label set | Leaky split (test utt.) | UA | Speaker-indep. split (test utt.) | UA | "
                  "UA difference | Macro-F1 difference |", "|---|---|---|---:|---|---:|---:|---:|"]
        lines += [f"| `{r.system}` | {r.label_set} | {r.leaky_split} ({r.leaky_n_test}) | {fmt(r.leaky_ua)} | "
                  f"{r.split} ({r.n_test}) | {fmt(r.ua)} | {r.ua_diff:+.3f} | {r.macro_f1_diff:+.3f} |"
                  for r in leakage.itertuples()]
        lines += ["", "A positive difference is what speaker leakage adds. Details: [leakage.csv](leakage.csv).", ""]
    lines += ["## Cross-corpus matrix (UA; rows: training corpora, columns: test corpus)", ""]
    if cross.empty:
        lines += ["Only one corpus among these runs. For a matrix, run speaker-independent experiments whose "
                  "`protocol.train_corpora` (or `corpora`) and test ids cover several corpora over a shared "
                  "label set (`labels.label_set: common`).", ""]
    for (name, group), sub in cross.groupby(["system", "label_set"], sort=False):
        matrix = sub.pivot(index="train", columns="test", values="ua")
        lines += [f"`{name}`, label set {group} (splits: {' '.join(sorted(set(sub.splits)))}):", "",
                  "| train \\ test | " + " | ".join(matrix.columns) + " |",
                  "|---|" + "---:|" * len(matrix.columns)]
        lines += [f"| {tr} | " + " | ".join(fmt(v) for v in row) + " |" for tr, row in matrix.iterrows()]
        lines += ["", "Details: [cross_corpus.csv](cross_corpus.csv).", ""]
    lines += ["## Figures", ""]
    for result in results:
        links = figures[result.system.name]
        lines.append(f"- `{result.system.name}`: [confusion matrix]({links['confusion']})"
                     + (f", [loss and accuracy curves]({links['curves']})" if "curves" in links
                        else " (no training history: a baseline)"))
    lines.append(f"- Learned layer weights: [layer_weights.png]({weights})" if weights
                 else "- Learned layer weights: no run has `layer_weights.json`.")
    notes = [n for r in results for n in r.notes] + [f"skipped {text}" for text in skipped]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _augmentation_words(value) -> str:
    return "augmented" if isinstance(value, bool) else f"augmented ({_plain(value)})"


def _plain(value) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def unique(names: Sequence[str], safe: Callable[[str], str]) -> dict[str, str]:
    """``{name: safe(name)}`` with every value distinct: names that ``safe`` maps alike (``lr0.01`` and
    ``lr0_01`` as file names or DVC metric keys) get ``_2``, ``_3``, ... in the order given, so no system's
    figures overwrite another's."""
    taken, out = set(), {}
    for name in dict.fromkeys(names):
        base = candidate = safe(name)
        n = 1
        while candidate in taken:
            n += 1
            candidate = f"{base}_{n}"
        taken.add(candidate)
        out[name] = candidate
    return out


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(text)).strip("_") or "labels"


def _key(name: str) -> str:
    return name.replace(".", "_")  # DVC joins nested metric keys with dots


def _num(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
