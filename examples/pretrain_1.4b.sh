#!/usr/bin/env bash
# LLaMA-1.4B with ALCoT (ℓmax 3), the paper's recipe: lr 2e-4 cosine to 2e-5, 8 GPUs, DP 8.
# Usage: DATA_PATH=data/pile_text_document bash examples/pretrain_1.4b.sh [extra flags]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_NAME=${RUN_NAME:-alcot_1.4b}
source examples/_common.sh
MODEL_ARGS=(--num-layers 24 --hidden-size 2048 --ffn-hidden-size 5504 --num-attention-heads 32)
exec "${LAUNCH[@]}" pretrain_alcot.py "${MODEL_ARGS[@]}" "${COMMON_ARGS[@]}" \
    --micro-batch-size 4 --lr 2e-4 --min-lr 2e-5 --tensor-model-parallel-size 1 "$@"
