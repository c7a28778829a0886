#!/usr/bin/env bash
# The embedded testbed backbone's recipe, after how LLaVA-style models are made (issue #19):
#   1. contrastive    CLIP-style pre-training of the vision tower on generated captions
#   2. text_pretrain  the language model alone, on scenes, questions and answers as text
#   3. align          LLaVA stage 1: the projector alone, image -> caption
#   4. instruct       LLaVA stage 2: instruction tuning on the ShapesVQA question mix
# Usage: bash scripts/testbed_recipe.sh [OUT_DIR] [extra overrides for every stage...]
# Each stage's run folder (checkpoints, logs, export) is OUT_DIR/<stage>; the final model is
# OUT_DIR/instruct/tiny-llava-shapes. Every stage prints its wall time.
set -euo pipefail
OUT=${1:-outputs/testbed_recipe}
shift || true
export HF_HUB_OFFLINE=1
stage() {  # stage NAME [overrides...]
  local name=$1; shift
  local start=$SECONDS
  python train.py "$@" "hydra.run.dir=$OUT/$name" "${EXTRA[@]}"
  echo "== stage $name: $((SECONDS - start)) s" | tee -a "$OUT/times.txt"
}
EXTRA=("$@")
mkdir -p "$OUT"
stage contrastive module=contrastive trainer.max_steps=${CONTRASTIVE_STEPS:-600} trainer.val_check_interval=200
stage text module=text_pretrain backbone=tiny "backbone.name_or_path=$OUT/contrastive/tiny-llava-contrastive" \
  trainer.max_steps=${TEXT_STEPS:-600} trainer.val_check_interval=200
stage align module=align backbone=tiny "backbone.name_or_path=$OUT/text/tiny-llava-text" \
  trainer.max_steps=${ALIGN_STEPS:-500} trainer.val_check_interval=250
stage instruct module=instruct "backbone.name_or_path=$OUT/align/tiny-llava-aligned" \
  trainer.max_steps=${INSTRUCT_STEPS:-2500} trainer.val_check_interval=500
