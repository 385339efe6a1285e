#!/usr/bin/env bash
# The README's main command (`make demo`): synthetic data -> training -> held-out evaluation -> batch inference.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=${DEMO_OUT:-runs/demo}
echo "== 1/4 synthetic data (built-in, no download)"
[ -f data/synthetic/datalist.json ] || $BIN/medrpn synth data/synthetic --cases 30 --seed 0
[ -f data/heldout/datalist.json ] || $BIN/medrpn synth data/heldout --cases 10 --seed 1 --val-fraction 1.0
echo "== 2/4 training (configs/demo.yaml)"
$BIN/medrpn fit --config configs/demo.yaml --trainer.default_root_dir "$OUT"
CKPT="$OUT/checkpoints/best.ckpt"
echo "== 3/4 evaluation on the held-out synthetic scans (FROC/CPM)"
$BIN/medrpn test --config configs/demo.yaml --ckpt_path "$CKPT" --data.datalist data/heldout/datalist.json \
  --trainer.logger false
if $BIN/medrpn --help | grep -q "^  infer"; then
  echo "== 4/4 batch inference over the held-out scans (DICOM series + NIfTI)"
  $BIN/medrpn infer --checkpoint "$CKPT" --input data/heldout/dicom --input data/heldout/nifti --output "$OUT/infer"
  echo "Open $OUT/infer/index.html to review the findings."
fi
