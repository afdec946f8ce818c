#!/usr/bin/env bash
# Prepare the checkout for scripts/gpu-check.sh on a lent GPU machine that has no network and no copy of the
# corpora (run it here, where pip works):
#   - the wheels of what the GPU image lacks (soundfile with cffi and pycparser, soxr), for its Python 3.12 x86-64,
#     into .whl/;
#   - RAVDESS's 16 kHz FLAC files (about 52 MB) into .gpu-data/ravdess/ (the ../shared beside a checkout does not
#     travel).
# Both folders are git-ignored (.gitignore) and must be carried: carry [".whl", ".gpu-data"], command
# `scripts/gpu-check.sh` (it installs the wheels when the image lacks the packages and reads .gpu-data/ravdess).
#   scripts/gpu-prepare.sh [RAVDESS_DIR]            (default ../shared/corpora/ravdess)
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-../shared/corpora/ravdess}"
[ -d "$src" ] || { echo "gpu-prepare: expected the RAVDESS folder at $src; pass it as the first argument" >&2; exit 2; }
rm -rf .whl && mkdir -p .whl .gpu-data
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
for pkg in soundfile cffi pycparser soxr; do
  "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform any -d .whl "$pkg"
done
rm -rf .gpu-data/ravdess
"${PYTHON:-python3}" - "$src" .gpu-data/ravdess <<'PY'
import os, shutil, sys  # the FLAC files and their folders only
shutil.copytree(sys.argv[1], sys.argv[2], ignore=lambda folder, names: [
    n for n in names if not n.endswith(".flac") and not os.path.isdir(os.path.join(folder, n))])
PY
echo "gpu-prepare: $(ls .whl | wc -l) wheels in .whl, $(find .gpu-data/ravdess -name '*.flac' | wc -l) files in .gpu-data/ravdess ($(du -sh .gpu-data | cut -f1)); carry [\".whl\", \".gpu-data\"] and run scripts/gpu-check.sh"
