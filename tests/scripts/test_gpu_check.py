"""scripts/gpu-check.sh: the GPU machine's check runs its CPU dry run end to end."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(ravdess_root, tmp_path):
    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), "--device", "cpu", "--files", "2",
                          "--audio-seconds", "4", "--corpus", str(ravdess_root)],
                         env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    exactness = json.loads((tmp_path / "exactness.json").read_text())
    assert exactness["files"] == 2 and exactness["within_1e-5"]
    records = json.loads((tmp_path / "bench.json").read_text())
    assert [r["dtype"] for r in records] == ["float32", "bfloat16"]
    assert all(r["vs_reference"] > 0 and r["reference_throughput"] > 0 for r in records)


def test_gpu_check_refuses_a_corpus_without_the_files(tmp_path):
    (tmp_path / "empty").mkdir()
    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), "--device", "cpu", "--files", "2",
                          "--corpus", str(tmp_path / "empty")],
                         env={**os.environ, "OUT": str(tmp_path / "out")}, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "expected at least 2 RAVDESS .flac files, found 0; pass --corpus DIR" in out.stderr
    assert not (tmp_path / "out" / "exactness.json").exists()
