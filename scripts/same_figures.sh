#!/bin/bash
# Behaviour check for restructurings: the same commands and seeds through every trainer, the comparison and
# prediction, into OUT. Run it from two checkouts (before and after) into two folders and compare them with
# `diff -r BEFORE AFTER`: only compare/table.csv may differ, in its `runs` column (the run paths).
# usage: scripts/same_figures.sh DATA ENCODER_DIR CORPUS_DIR OUT
#   DATA: the data/ folder of a finished `dvc repro` with an eGeMAPS store and a store of ENCODER_DIR's
#   encoder named `tiny` (data/features/{egemaps,tiny}); CORPUS_DIR: RAVDESS (Actor_01, Actor_02 are read).
set -euo pipefail
D=$1; ENC=$2; CORPUS=$3; OUT=$(realpath -m "$4")
rm -rf "$OUT"; mkdir -p "$OUT"
M="--manifest $D/manifest.csv --split $D/splits.csv --label-set ravdess8"
python -m baselines.train --features $D/features/egemaps $M --model rf --n-estimators 60 --out $OUT/runs/rf_egemaps
python -m baselines.train --features $D/features/egemaps --manifest $D/manifest.csv --split $D/splits_random.csv \
  --label-set ravdess8 --model rf --n-estimators 60 --out $OUT/runs/rf_random
python -m baselines.train --features $D/features/egemaps $M --model svm --normalisation speaker --out $OUT/runs/svm_egemaps
python -m heads.train --features $D/features/egemaps $M --head conv --epochs 2 --max-frames 200 --out $OUT/runs/conv_egemaps
python -m heads.train --features $D/features/tiny $M --head linear --epochs 3 --ensemble 2 --out $OUT/runs/linear_tiny
python -m heads.train --features $D/features/tiny $M --head conv --epochs 2 --normalisation speaker --layers 0 2 \
  --out $OUT/runs/conv_tiny
python -m baselines.train $M --model mfcc_cnn --epochs 1 --max-frames 150 --out $OUT/runs/mfcc_cnn
python -m baselines.probe --features $D/features/tiny $M --out $OUT/probes/tiny
python -m pipeline.compare $OUT/runs $OUT/probes --out $OUT/compare --manifest $D/manifest.csv
F1=$CORPUS/Actor_01/03-01-05-01-01-01-01.flac
F2=$CORPUS/Actor_02/03-01-03-02-01-01-02.flac
for r in rf_egemaps svm_egemaps conv_egemaps mfcc_cnn; do  # svm (speaker normalisation) is refused: exit 2
  python -m heads.predict $F1 $F2 --model $OUT/runs/$r --format csv > $OUT/predict_$r.csv 2> $OUT/predict_$r.err \
    || echo "exit $?" >> $OUT/predict_$r.err
done
python -m heads.predict $F1 --model $OUT/runs/linear_tiny --encoder $ENC --segment-seconds 1 --format json \
  > $OUT/predict_linear_tiny.json
