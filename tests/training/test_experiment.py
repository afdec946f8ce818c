"""pipeline.experiment: what a manifest and a split give a trainer, and what they leave out (said, never silent)."""

from __future__ import annotations

import pandas as pd

from pipeline.experiment import load_experiment
from tests.heads.conftest import make_experiment


def test_utterances_left_out_by_the_label_set_or_the_split_are_counted(tmp_path, capsys):
    manifest, split, _ = make_experiment(tmp_path, per_class=2)
    rows = pd.read_csv(manifest)
    extra = rows.iloc[:3].assign(id=lambda f: f["id"] + "_new")  # recorded after the split was made
    surprised = rows.iloc[:2].assign(id=lambda f: f["id"] + "_s", emotion="surprised")
    pd.concat([rows, extra, surprised]).to_csv(manifest, index=False)
    exp = load_experiment([manifest], split, "four")
    said = capsys.readouterr().err
    assert exp.excluded == {"surprised": 2} and "label set 'four' leaves out 2 utterances" in said
    assert "warning: 3 utterances of label set 'four' are in no fold of" in said
    used = {uid for fold in exp.folds for uid in fold.train + fold.val + fold.test}
    assert not used & set(extra["id"]) and set(rows["id"]) <= used
