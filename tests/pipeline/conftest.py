"""Writers of small synthetic corpora, each in its corpus's own naming convention."""

from __future__ import annotations

import pytest


@pytest.fixture
def ravdess_dir(tmp_path, write_audio):
    """Two actors (one male, one female), every emotion once or twice, 16 kHz mono."""

    def _make(actors=(1, 2), emotions=range(1, 9), statements=(1,), rate=16000):
        root = tmp_path / "ravdess"
        for actor in actors:
            for emotion in emotions:
                for statement in statements:
                    name = f"03-01-{emotion:02d}-01-{statement:02d}-01-{actor:02d}.wav"
                    write_audio(root / f"Actor_{actor:02d}" / name, seconds=0.3, sample_rate=rate,
                                f0=120 + 10 * emotion, seed=actor * 100 + emotion)
        return root

    return _make
