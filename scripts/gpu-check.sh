#!/usr/bin/env bash
# The check to run on a lent GPU machine (under 5 minutes on one H100): CUDA float32 against CPU float32 on 20
# RAVDESS files, then the extraction benchmark over all of RAVDESS (float32, bfloat16, float16; the target for the
# base architecture is >= 2000 s of audio per second in bfloat16 on an H100).
#   scripts/gpu-check.sh [--device cpu] [--corpus DIR] [--out DIR]     (--device cpu: a dry run of the same steps)
# Results: DIR/exactness.json and DIR/bench.json (default DIR: $OUT where set, else ./gpu-check).
# On a machine without network or corpora, first run scripts/gpu-prepare.sh where pip works, then carry .whl and
# .gpu-data: the wheels are installed here when the image lacks a package, and .gpu-data/ravdess is the default corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if ! "$python" -c "import soundfile, soxr" 2>/dev/null; then
  [ -d .whl ] || { echo "gpu-check: soundfile and soxr are missing and there is no .whl folder; run scripts/gpu-prepare.sh where pip works and carry .whl" >&2; exit 2; }
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site .whl/*.whl
  export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi
corpus=()
if [ -d .gpu-data/ravdess ] && [[ " $* " != *" --corpus "* ]]; then corpus=(--corpus "$PWD/.gpu-data/ravdess"); fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # runs without an install
exec "$python" scripts/gpu_check.py --out "${OUT:-gpu-check}" "${corpus[@]}" "$@"
