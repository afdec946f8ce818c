#!/usr/bin/env bash
# The check to run on a lent GPU machine (under 5 minutes on one H100): CUDA float32 against CPU float32 on 20
# RAVDESS files, then the extraction benchmark over all of RAVDESS (float32, bfloat16, float16; the target for the
# base architecture is >= 2000 s of audio per second in bfloat16 on an H100).
#   scripts/gpu-check.sh [--device cpu] [--corpus DIR] [--out DIR]     (--device cpu: a dry run of the same steps)
# Results: DIR/exactness.json and DIR/bench.json (default DIR: $OUT where set, else ./gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # runs without an install
exec "${PYTHON:-python3}" scripts/gpu_check.py --out "${OUT:-gpu-check}" "$@"
