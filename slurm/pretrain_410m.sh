#!/usr/bin/env bash
# A 410M LLaMA with ALCoT on Slurm: one task per GPU, ranks from the Slurm environment (no torchrun).
#   TOKENIZER_MODEL=/path/to/llama-2/tokenizer.model sbatch slurm/pretrain_410m.sh [flags]   # from the repo root
#   DRY_RUN=1 TOKENIZER_MODEL=... bash slurm/pretrain_410m.sh [flags]   # print the srun line and the memory plan
# DP 8 on one node, plain DDP, selective recompute (DRY_RUN=1 prints the memory plan: ~42 % headroom on 80 GB).
# Extra flags are appended (the last value wins). Pre-emption, requeue, retention and the
# environment variables: slurm/_job.sh and docs/launching.md.
#SBATCH --job-name=alcot-410m
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=6:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
SCRIPT=${BASH_SOURCE[0]}
RUN_NAME=alcot_410m
MODEL_ARGS=(
    --num-layers 24 --hidden-size 1024 --ffn-hidden-size 2816 --num-attention-heads 16
    --seq-length 2048 --max-position-embeddings 2048 --untie-embeddings-and-output-weights
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
    --micro-batch-size 4 --global-batch-size 256 --recompute-granularity selective
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-fraction 0.02
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16
    --save-interval 500 --eval-interval 1000 --eval-iters 50 --log-interval 10
    --max-nan-skips 10 --peak-flops 989
    --latent-method alcot --latent-max-steps 3
)
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}" || exit 2
if [ ! -f slurm/_job.sh ]; then
    echo "error: $(pwd) is not the repository root: submit with sbatch slurm/pretrain_410m.sh from there" >&2
    exit 2
fi
source slurm/_job.sh "$@"
