#!/usr/bin/env bash
# The README's main command (`make demo`): synthetic data -> training -> held-out evaluation -> batch inference ->
# scoring the batch-inference output against the annotations.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=${DEMO_OUT:-runs/demo}
# extra `medrpn fit` arguments, e.g. DEMO_FIT_ARGS="--trainer.max_epochs=2" for a quick end-to-end check
read -r -a FIT_ARGS <<< "${DEMO_FIT_ARGS:-}"
echo "== 1/5 synthetic data (built-in, no download)"
[ -f data/synthetic/datalist.json ] || $BIN/medrpn synth data/synthetic --cases 30 --seed 0
# (seriesuids.csv, the scan list of step 5, is newer than the first held-out folders: rewrite those, same scans)
[ -f data/heldout/seriesuids.csv ] || $BIN/medrpn synth data/heldout --cases 10 --seed 1 --val-fraction 1.0
echo "== 2/5 training (configs/demo.yaml)"
$BIN/medrpn fit --config configs/demo.yaml --trainer.default_root_dir "$OUT" --checkpoint.dirpath "$OUT/checkpoints" \
  "${FIT_ARGS[@]}"
CKPT="$OUT/checkpoints/best.ckpt"   # best validation CPM
[ -f "$CKPT" ] || CKPT="$OUT/checkpoints/last.ckpt"   # (a run too short to validate)
echo "== 3/5 evaluation on the held-out synthetic scans (FROC/CPM)"
# flip test-time augmentation (x and y flips, scores averaged over the 3 views): README, "Test-time augmentation"
$BIN/medrpn test --config configs/demo.yaml --ckpt_path "$CKPT" --data.datalist data/heldout/datalist.json \
  --model.inference.flip_tta true --trainer.logger false
echo "== 4/5 batch inference over the held-out scans (DICOM series + NIfTI) with overlays for review"
$BIN/medrpn infer --checkpoint "$CKPT" --input data/heldout/dicom --input data/heldout/nifti --output "$OUT/infer" \
  --tta --overwrite
echo "== 5/5 the batch-inference findings of the DICOM series scored against the annotations (medrpn froc)"
# the same model, views and scans as step 3, scored from the files a user gets; the NIfTI copies of the
# scans (named by file stem) are not in the scan list and are left out
$BIN/medrpn froc "$OUT/infer" --annotations data/heldout/annotations.csv --scans data/heldout/seriesuids.csv \
  --out "$OUT/infer/froc" --title "held-out DICOM series, medrpn infer --tta"
echo
echo "Done. Review the findings: open $OUT/infer/index.html"
echo "(per scan: proposals.json, NIfTI overlays, 3D Slicer markups, DICOM SEG/SR/GSPS, review PNGs;"
echo " the FROC of the DICOM series: $OUT/infer/froc/froc.md and froc.png)"
