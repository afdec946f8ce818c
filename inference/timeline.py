"""Segment timelines for long recordings: planning the windows, cutting them from a stream, aggregating
their probabilities into one label, and drawing them.

Windows start every ``hop`` seconds and last ``segment`` seconds; the last one ends at the end of the file.
A final piece shorter than half a segment is merged into the window before it (so no window is a sliver),
and a file no longer than one segment is one window covering the whole file.

Example:
    >>> plan_segments(7.0, segment=3.0, hop=3.0)
    [(0.0, 3.0), (3.0, 7.0)]
    >>> plan_segments(8.0, segment=3.0, hop=3.0)
    [(0.0, 3.0), (3.0, 6.0), (6.0, 8.0)]
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np


def plan_segments(duration: float, *, segment: float, hop: float) -> list[tuple[float, float]]:
    """The ``(start, end)`` windows, in seconds, covering a file of ``duration`` seconds.

    Args:
        duration: length of the file in seconds (> 0).
        segment: window length ``S`` in seconds (> 0).
        hop: seconds between window starts (> 0); ``hop > segment`` leaves gaps between windows.

    Returns:
        Windows in time order. The last ends at ``duration`` unless gaps skip past the end; a last piece
        shorter than ``S / 2`` is merged into the window before it (which then ends at ``duration``).

    Raises:
        ValueError: a non-positive argument.
    """
    if duration <= 0 or segment <= 0 or hop <= 0:
        raise ValueError(f"expected positive duration, segment and hop, found {duration}, {segment}, {hop}.")
    if duration <= segment:
        return [(0.0, float(duration))]
    windows: list[tuple[float, float]] = []
    for k in range(int(np.ceil(duration / hop)) + 1):
        start = round(k * hop, 6)
        if start >= duration:
            break
        end = round(start + segment, 6)
        if end >= duration - 1e-6:
            if duration - start < segment / 2 and windows and windows[-1][1] >= start:
                windows[-1] = (windows[-1][0], float(duration))
            else:
                windows.append((start, float(duration)))
            break
        windows.append((start, end))
    return windows


def cut_windows(blocks: Iterable[np.ndarray], windows: Sequence[tuple[float, float]], *,
                sample_rate: int) -> Iterator[tuple[float, float, np.ndarray]]:
    """Cut planned windows out of contiguous audio blocks, keeping only what later windows still need.

    Args:
        blocks: consecutive mono ``[n]`` float32 blocks at ``sample_rate`` (e.g. ``pipeline.audio.stream_audio``).
        windows: ``(start, end)`` seconds from :func:`plan_segments`; the last one runs to the end of the stream.
        sample_rate: rate of the blocks.

    Yields:
        ``(start, end, wave [N])`` per window, ``end`` being the true end of the audio for the last window.
        Windows that start after the stream ended (header longer than the data) are not yielded.
    """
    bounds = [(round(s * sample_rate), round(e * sample_rate)) for s, e in windows]
    buf, buf_start, i = np.zeros(0, dtype=np.float32), 0, 0
    for block in blocks:
        buf = np.concatenate([buf, block]) if len(buf) else np.asarray(block, dtype=np.float32)
        while i < len(bounds) - 1 and buf_start + len(buf) >= bounds[i][1]:
            lo, hi = bounds[i]
            yield lo / sample_rate, hi / sample_rate, buf[lo - buf_start:hi - buf_start].copy()
            i += 1
            drop = max(0, min(bounds[i][0] - buf_start, len(buf)))
            buf, buf_start = buf[drop:], buf_start + drop
    total = buf_start + len(buf)
    for lo, hi in bounds[i:]:
        hi = total if (lo, hi) == bounds[-1] else min(hi, total)
        if hi > lo:
            yield lo / sample_rate, hi / sample_rate, buf[lo - buf_start:hi - buf_start].copy()


def weighted_mean(probabilities: np.ndarray, durations: Sequence[float]) -> np.ndarray:
    """Duration-weighted mean of segment probabilities: ``[S, C]`` and ``[S]`` seconds to ``[C]``."""
    weights = np.asarray(durations, dtype=np.float64)
    return (np.asarray(probabilities, dtype=np.float64) * weights[:, None]).sum(axis=0) / weights.sum()


def plot_timelines(results: Sequence[dict], labels: Sequence[str], out: str | os.PathLike) -> None:
    """Draw class probabilities over time, one panel per file that has ``segments``, into one PNG.

    Each segment is a stacked bar from its start (width: the hop, or its own length when shorter), so the
    colours show how the probability mass is shared between classes; the title gives the file's label. A
    segment of digital silence (``probabilities`` None) is a grey hatched bar labelled ``silent``.

    Args:
        results: per-file dicts as :func:`heads.predict.predict_file` returns (``file``, ``label``,
            ``segments``); files without segments (errors) are left out.
        labels: class names, in the run's order.
        out: the PNG to write.

    Raises:
        ValueError: no result has segments.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [r for r in results if r.get("segments")]
    if not drawn:
        raise ValueError(f"{out}: expected at least one file with a timeline to plot, found none "
                         "(every file failed).")
    colours = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20").colors
    fig, axes = plt.subplots(len(drawn), 1, figsize=(11, 1.0 + 2.2 * len(drawn)), squeeze=False)
    for ax, result in zip(axes[:, 0], drawn, strict=True):
        segs = result["segments"]
        starts = np.array([s["start"] for s in segs])
        widths = np.array([s["end"] - s["start"] for s in segs])
        if len(starts) > 1:
            widths = np.minimum(widths, np.diff(starts, append=starts[-1] + widths[-1]))
        bottom = np.zeros(len(segs))
        silent = np.array([s.get("probabilities") is None for s in segs])
        for c, label in enumerate(labels):
            p = np.array([0.0 if s.get("probabilities") is None else s["probabilities"][label] for s in segs])
            ax.bar(starts, p, width=widths, bottom=bottom, align="edge", color=colours[c % len(colours)],
                   label=label, linewidth=0)
            bottom += p
        if silent.any():  # digital silence is not classified: a grey bar, so the gap reads as silence
            ax.bar(starts[silent], np.ones(int(silent.sum())), width=widths[silent], align="edge",
                   color="0.85", hatch="//", edgecolor="0.6", linewidth=0, label="silent")
        ax.set_xlim(0, segs[-1]["end"])
        ax.set_ylim(0, 1)
        ax.set_ylabel("probability")
        title = result.get("label") or "every segment silent"
        ax.set_title(f"{os.path.basename(result['file'])}: {title}", fontsize=10, loc="left")
    axes[-1, 0].set_xlabel("time (s)")
    handles, names = axes[0, 0].get_legend_handles_labels()  # top of the stack first, as drawn
    axes[0, 0].legend(handles[::-1], names[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                      frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
