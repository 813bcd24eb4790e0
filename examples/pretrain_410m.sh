#!/usr/bin/env bash
# LLaMA-410M with ALCoT (ℓmax 3), the paper's recipe: lr 3e-4 cosine to 3e-5, 8 GPUs, DP 8.
# Usage: DATA_PATH=data/pile_text_document bash examples/pretrain_410m.sh [extra flags]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_NAME=${RUN_NAME:-alcot_410m}
source examples/_common.sh
MODEL_ARGS=(--num-layers 24 --hidden-size 1024 --ffn-hidden-size 2752 --num-attention-heads 16)
exec "${LAUNCH[@]}" pretrain_alcot.py "${MODEL_ARGS[@]}" "${COMMON_ARGS[@]}" \
    --micro-batch-size 4 --lr 3e-4 --min-lr 3e-5 --tensor-model-parallel-size 1 "$@"
