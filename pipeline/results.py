"""The comparison's result type, shared by ``pipeline.compare`` (which builds results) and ``pipeline.audits``
(which sets them against one another)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from pipeline import stats
from pipeline.runs import System


@dataclass
class Result:
    """A system and its figures: ``row`` (one table row), the UA structure, fold figures and notes."""

    system: System
    row: dict
    structure: stats.UAStructure
    folds: pd.DataFrame
    notes: list[str] = field(default_factory=list)
