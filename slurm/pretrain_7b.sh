#!/usr/bin/env bash
# LLaMA-7B with ALCoT on Slurm: one task per GPU, ranks from the Slurm environment (no torchrun).
#   TOKENIZER_MODEL=/path/to/llama-2/tokenizer.model sbatch slurm/pretrain_7b.sh [flags]   # from the repo root
#   DRY_RUN=1 TOKENIZER_MODEL=... bash slurm/pretrain_7b.sh [flags]   # print the srun line and the memory plan
# TP 2 × DP 16 with the distributed optimizer (ZeRO-1: Adam state sharded over DP) and full recompute
# (DRY_RUN=1 prints the memory plan: ~45 % headroom on 80 GB).
# Extra flags are appended (the last value wins). Pre-emption, requeue, retention and the
# environment variables: slurm/_job.sh and docs/launching.md.
#SBATCH --job-name=alcot-7b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
SCRIPT=${BASH_SOURCE[0]}
RUN_NAME=alcot_7b
MODEL_ARGS=(
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32
    --seq-length 2048 --max-position-embeddings 2048 --untie-embeddings-and-output-weights
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1
    --use-distributed-optimizer --zero-stage 1
    --micro-batch-size 1 --global-batch-size 256
    --lr 1.5e-4 --min-lr 1.5e-5 --lr-decay-style cosine --lr-warmup-fraction 0.02
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16
    --recompute-granularity full
    --save-interval 500 --eval-interval 1000 --eval-iters 50 --log-interval 10
    --max-nan-skips 10 --peak-flops 989
    --latent-method alcot --latent-max-steps 3
)
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}" || exit 2
if [ ! -f slurm/_job.sh ]; then
    echo "error: $(pwd) is not the repository root: submit with sbatch slurm/pretrain_7b.sh from there" >&2
    exit 2
fi
source slurm/_job.sh "$@"
