#!/usr/bin/env bash
# The README's main command (`make demo`): synthetic data -> training -> held-out evaluation -> batch inference.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=${DEMO_OUT:-runs/demo}
# extra `medrpn fit` arguments, e.g. DEMO_FIT_ARGS="--trainer.max_epochs=2" for a quick end-to-end check
read -r -a FIT_ARGS <<< "${DEMO_FIT_ARGS:-}"
echo "== 1/4 synthetic data (built-in, no download)"
[ -f data/synthetic/datalist.json ] || $BIN/medrpn synth data/synthetic --cases 30 --seed 0
[ -f data/heldout/datalist.json ] || $BIN/medrpn synth data/heldout --cases 10 --seed 1 --val-fraction 1.0
echo "== 2/4 training (configs/demo.yaml)"
$BIN/medrpn fit --config configs/demo.yaml --trainer.default_root_dir "$OUT" --checkpoint.dirpath "$OUT/checkpoints" \
  "${FIT_ARGS[@]}"
CKPT="$OUT/checkpoints/best.ckpt"   # best validation CPM
[ -f "$CKPT" ] || CKPT="$OUT/checkpoints/last.ckpt"   # (a run too short to validate)
echo "== 3/4 evaluation on the held-out synthetic scans (FROC/CPM)"
# flip test-time augmentation (x and y flips, scores averaged over the 3 views): README, "Test-time augmentation"
$BIN/medrpn test --config configs/demo.yaml --ckpt_path "$CKPT" --data.datalist data/heldout/datalist.json \
  --model.inference.flip_tta true --trainer.logger false
echo "== 4/4 batch inference over the held-out scans (DICOM series + NIfTI) with overlays for review"
$BIN/medrpn infer --checkpoint "$CKPT" --input data/heldout/dicom --input data/heldout/nifti --output "$OUT/infer" \
  --tta --overwrite
echo
echo "Done. Review the findings: open $OUT/infer/index.html"
echo "(per scan: proposals.json, NIfTI overlays, 3D Slicer markups, DICOM SEG/SR/GSPS, review PNGs)"
