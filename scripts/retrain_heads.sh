#!/usr/bin/env bash
# Retrain every shipped head on the backbone now in checkpoints/tiny-llava-shapes (after a new backbone
# is shipped, the old heads refuse it: their backbone fingerprint no longer matches).
# Usage: bash scripts/retrain_heads.sh [OUT_DIR]
# Each head's run folder is OUT_DIR/<head>; its export OUT_DIR/<head>/<head>-tiny (copy it into
# checkpoints/ with its card once its figures are measured). DyVTE's thresholds are then chosen on the
# validation split by benchmarks/dyvte_thresholds.py, as its card says.
set -euo pipefail
OUT=${1:-outputs/heads}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
for head in bavit atp lvpruning dyvte; do
  start=$SECONDS
  python train.py "module=$head" "module.export_dir=$OUT/$head/$head-tiny" "hydra.run.dir=$OUT/$head"
  echo "== $head: $((SECONDS - start)) s" | tee -a "$OUT/times.txt"
done
start=$SECONDS
python benchmarks/dyvte_thresholds.py --head "$OUT/dyvte/dyvte-tiny" --max-loss 1.0 --cache "$OUT/dyvte-tables" \
  --save "$OUT/dyvte/dyvte-tiny"
echo "== dyvte thresholds: $((SECONDS - start)) s" | tee -a "$OUT/times.txt"
