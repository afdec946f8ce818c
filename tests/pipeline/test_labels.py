import pandas as pd
import pytest

from pipeline.labels import EMOTIONS, LABEL_SETS, select_labels

FRAME = pd.DataFrame({
    "corpus": ["ravdess"] * 4 + ["emodb"] * 3,
    "emotion": ["neutral", "calm", "happy", "surprised", "neutral", "happy", "boredom"],
})


def test_named_sets_are_canonical():
    for labels in LABEL_SETS.values():
        assert all(label in EMOTIONS for label in labels)
    assert len(LABEL_SETS["ravdess8"]) == 8 and LABEL_SETS["six"] == ("neutral", "happy", "sad", "angry", "fearful", "disgust")


def test_select_reports_what_it_excludes():
    sel = select_labels(FRAME, "six")
    assert sel.labels == list(LABEL_SETS["six"])
    assert sorted(sel.frame.emotion) == ["happy", "happy", "neutral", "neutral"]
    assert sel.excluded == {"calm": 1, "surprised": 1, "boredom": 1}


def test_merge_calm_and_common():
    sel = select_labels(FRAME, "common", merge_calm=True)
    assert sel.labels == ["neutral", "happy"] and len(sel.frame) == 5
    assert select_labels(FRAME, "ravdess7").merge_calm is True


def test_unknown_or_empty_label_set():
    with pytest.raises(ValueError, match="unknown label set"):
        select_labels(FRAME, "eight")
    with pytest.raises(ValueError, match="keeps no utterance"):
        select_labels(FRAME[FRAME.emotion == "boredom"], "four")


def test_a_missing_or_unharmonised_emotion_is_refused_not_left_out_silently():
    frame = pd.DataFrame({"id": ["a", "b", "c"], "corpus": "x", "emotion": ["happy", None, "Happy"]})
    with pytest.raises(ValueError, match=r"found 2 rows with \['\(missing\)', 'Happy'\] \(e.g. id 'b'\)"):
        select_labels(frame, "four")
