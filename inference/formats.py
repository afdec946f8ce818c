"""Output formats of ``heads.predict``: JSON, CSV and an aligned text table.

JSON is a list with, per file, ``file, duration_s, label, probabilities ({label: p}), label_from`` and, with
a timeline, ``segments`` (``start, end, label, probabilities``); a failed file is ``{file, error, reason}``.
CSV and the table are flat forms of the same: one row per file, then one row per segment; they keep every field
(``label_from``, a segment's ``silent``, a failure's ``reason``), so a script reading the CSV learns what the JSON says.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from enum import StrEnum


class OutputFormat(StrEnum):
    """What ``heads.predict --format`` prints."""

    JSON = "json"
    CSV = "csv"
    TABLE = "table"


def to_json(results: Sequence[dict], labels: Sequence[str]) -> str:
    """The results as an indented JSON list (``labels`` unused: each entry names its classes)."""
    return json.dumps(list(results), indent=1) + "\n"


def to_csv(results: Sequence[dict], labels: Sequence[str]) -> str:
    """One row per file (``segment`` empty) followed by one row per segment (``segment`` = 0, 1, ...).

    Columns: ``file, segment, start, end, label, <one probability column per label>, error, reason, label_from,
    silent``: ``error`` and ``reason`` on a failed file's row, ``label_from`` (``whole`` or ``segments``) on a
    file's row, ``silent`` (``True``: digital silence, not classified) on every row of a file that was classified.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file", "segment", "start", "end", "label", *labels, "error", "reason", "label_from", "silent"])
    for r in results:
        if "error" in r:
            writer.writerow([r["file"], "", "", "", "", *[""] * len(labels), r["error"], r.get("reason", ""), "", ""])
            continue
        rows = [("", 0.0, r["duration_s"], r)] + [(i, s["start"], s["end"], s) for i, s in enumerate(r.get("segments", []))]
        for index, start, end, item in rows:
            probs = item["probabilities"] or {}
            writer.writerow([r["file"], index, start, end, item["label"] or "",
                             *[probs.get(label, "") for label in labels], "", "",
                             r["label_from"] if item is r else "", bool(item.get("silent", False))])
    return out.getvalue()


def to_table(results: Sequence[dict], labels: Sequence[str]) -> str:
    """Aligned text: per file a line with its label and probabilities, then its segments indented."""
    width = max(8, *(len(label) for label in labels))
    head = f"{'':<24} {'label':<{width}} " + " ".join(f"{label:>{width}}" for label in labels)
    lines = [head]
    for r in results:
        if "error" in r:
            lines.append(f"{r['file']}\n  error ({r.get('reason', 'unknown')}): {r['error']}")
            continue
        lines.append(f"{r['file']}  ({r['duration_s']:.2f} s, label from {r['label_from']})")
        for name, item in [("whole file", r)] + [(f"{s['start']:8.2f}-{s['end']:<8.2f}", s) for s in r.get("segments", [])]:
            probs = " ".join(f"{item['probabilities'][label]:>{width}.3f}" for label in labels) \
                if item["probabilities"] else "(silence)"
            lines.append(f"  {name:<22} {item['label'] or '-':<{width}} {probs}")
    return "\n".join(lines) + "\n"
