"""The comparison's result type, shared by ``pipeline.compare`` (which builds results) and ``evaluation.audits``
(which sets them against one another)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from evaluation import stats
from evaluation.systems import System


@dataclass
class Result:
    """A system and its figures: ``row`` (one table row), the UA structure, fold figures and notes."""

    system: System
    row: dict
    structure: stats.UAStructure
    folds: pd.DataFrame
    notes: list[str] = field(default_factory=list)
