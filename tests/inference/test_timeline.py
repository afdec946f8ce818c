"""Timeline segments: planned to cover the file, cut from uneven blocks, averaged by duration."""

from __future__ import annotations

import numpy as np
import pytest

from inference.timeline import cut_windows, plan_segments, weighted_mean


@pytest.mark.parametrize("duration,segment,hop,expected", [
    (2.0, 3.0, 3.0, [(0.0, 2.0)]),                                   # shorter than a segment: one segment
    (3.0, 3.0, 3.0, [(0.0, 3.0)]),
    (8.0, 3.0, 3.0, [(0.0, 3.0), (3.0, 6.0), (6.0, 8.0)]),            # 2 s tail kept
    (7.0, 3.0, 3.0, [(0.0, 3.0), (3.0, 7.0)]),                        # 1 s tail < S/2 joins the previous
    (5.0, 2.0, 1.0, [(0.0, 2.0), (1.0, 3.0), (2.0, 4.0), (3.0, 5.0)]),  # overlapping
    (20.0, 3.0, 3.0, [(0.0, 3.0), (3.0, 6.0), (6.0, 9.0), (9.0, 12.0), (12.0, 15.0), (15.0, 18.0),
                      (18.0, 20.0)]),
])
def test_plan_segments(duration, segment, hop, expected):
    assert plan_segments(duration, segment=segment, hop=hop) == expected


def test_cut_windows_from_uneven_blocks_equal_slices():
    x = np.arange(16000 * 7, dtype=np.float32)
    blocks = np.split(x, [1000, 17000, 17001, 60000, 90000])
    plan = plan_segments(7.0, segment=2.0, hop=1.5)
    cut = list(cut_windows(blocks, plan, sample_rate=16000))
    assert [(s, e) for s, e, _ in cut] == plan
    for start, end, wave in cut:
        np.testing.assert_array_equal(wave, x[round(start * 16000):round(end * 16000)])


def test_weighted_mean_weights_by_duration():
    p = weighted_mean(np.array([[1.0, 0.0], [0.0, 1.0]]), [3.0, 1.0])
    np.testing.assert_allclose(p, [0.75, 0.25])
