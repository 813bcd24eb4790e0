#!/usr/bin/env bash
# LLaMA-2-7B shape with ALCoT (ℓmax 3): TP 2 × DP 4 per 8-GPU node, full activation recompute.
# Same optimizer recipe; lr 1.5e-4 cosine to 1.5e-5 (the paper stops at 1.4B; this is our choice).
# Usage: TOKENIZER_MODEL=<llama-2 tokenizer.model> NNODES=4 NODE_RANK=<i> MASTER_ADDR=<node0> \
#            bash examples/pretrain_7b.sh [extra flags]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_NAME=${RUN_NAME:-alcot_7b}
if [ -z "${TOKENIZER_MODEL:-}" ]; then
    echo "error: set TOKENIZER_MODEL to the LLaMA-2 SentencePiece model (tokenizer.model)" >&2
    exit 2
fi
TOKENIZER_TYPE=${TOKENIZER_TYPE:-Llama2Tokenizer}
source examples/_common.sh
MODEL_ARGS=(--num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32)
exec "${LAUNCH[@]}" pretrain_alcot.py "${MODEL_ARGS[@]}" "${COMMON_ARGS[@]}" \
    --micro-batch-size 1 --lr 1.5e-4 --min-lr 1.5e-5 --tensor-model-parallel-size 2 \
    --recompute-granularity full "$@"
