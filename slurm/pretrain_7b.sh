#!/usr/bin/env bash
# LLaMA-7B with ALCoT on Slurm: one task per GPU, ranks from the Slurm environment (no torchrun).
#   TOKENIZER_MODEL=/path/to/llama-2/tokenizer.model sbatch slurm/pretrain_7b.sh   # edit the #SBATCH lines first
#   DRY_RUN=1 TOKENIZER_MODEL=... bash slurm/pretrain_7b.sh [flags]   # print the srun command, start nothing
# Pre-emption: Slurm sends SIGTERM 120 s before the time limit; --exit-signal-handler finishes the
# current step, saves to $CKPT_DIR and exits 0, and the job requeues itself and resumes (--load).
#SBATCH --job-name=alcot-7b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=SIGTERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
DRY_RUN=${DRY_RUN:-0}

if [ -z "${TOKENIZER_MODEL:-}" ]; then
    echo "error: set TOKENIZER_MODEL to the LLaMA-2 SentencePiece model, e.g." >&2
    echo "  TOKENIZER_MODEL=/models/llama-2-7b/tokenizer.model sbatch slurm/pretrain_7b.sh" >&2
    exit 2
fi

# megatron_alcot.parallel.launch reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID inside the srun
# step and takes the master from the first host of SLURM_JOB_NODELIST; the port is derived from the
# job id. Exported here too so that every task sees the same values.
if [ -n "${SLURM_JOB_ID:-}" ]; then
    export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
elif [ "$DRY_RUN" != 1 ]; then
    echo "error: submit this script with sbatch (or DRY_RUN=1 bash $0 to print the srun command)" >&2
    exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1
# NCCL: on a hang or watchdog timeout rerun with NCCL_DEBUG=INFO (and NCCL_DEBUG_SUBSYS=INIT,NET)
# to see which interface and transport each rank picked; pin the interface with NCCL_SOCKET_IFNAME
# (e.g. ib0 or the cluster's data NIC) if the wrong one is chosen. Raise the collective timeout
# with --distributed-timeout-minutes rather than disabling the watchdog.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

DATA_PATH=${DATA_PATH:-data/pile_text_document}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-Llama2Tokenizer}
CKPT_DIR=${CKPT_DIR:-checkpoints/alcot_7b}
PYTHON=${PYTHON:-python}
TRAIN_ITERS=${TRAIN_ITERS:-50000}

ARGS=(
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32
    --seq-length 2048 --max-position-embeddings 2048 --untie-embeddings-and-output-weights
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1
    --micro-batch-size 1 --global-batch-size 256 --train-iters "$TRAIN_ITERS"
    --lr 1.5e-4 --min-lr 1.5e-5 --lr-decay-style cosine --lr-warmup-fraction 0.02
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16
    --recompute-granularity full
    --data-path "$DATA_PATH" --split 969,30,1 --num-workers 2
    --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL"
    --save "$CKPT_DIR" --load "$CKPT_DIR" --save-interval 500
    --eval-interval 1000 --eval-iters 50 --log-interval 10 --tensorboard-dir "tensorboard/alcot_7b"
    --metrics-file "logs/alcot_7b_metrics.jsonl"
    --exit-signal-handler --distributed-timeout-minutes 30 --max-nan-skips 10 --peak-flops 989
    --latent-method alcot --latent-max-steps 3
)

# SIGTERM@120 goes to the training processes (srun's tasks): they finish the step, save, exit 0.
CMD=(srun --kill-on-bad-exit=1 --cpu-bind=none "$PYTHON" pretrain_alcot.py "${ARGS[@]}" "$@")
if [ "$DRY_RUN" = 1 ]; then
    echo "MASTER_ADDR=${MASTER_ADDR:-<first host of SLURM_JOB_NODELIST>} MASTER_PORT=${MASTER_PORT:-<20000 + SLURM_JOB_ID % 20000>}"
    for arg in "${CMD[@]}"; do       # copy-pasteable: quote only what the shell would split
        if [[ $arg =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then printf '%s ' "$arg"; else printf '%q ' "$arg"; fi
    done
    echo
    exit 0
fi
mkdir -p logs
"${CMD[@]}"

# Not finished yet (pre-empted or out of time): requeue; the next run resumes from --load.
LATEST=$(cat "$CKPT_DIR/latest_checkpointed_iteration.txt" 2>/dev/null || echo 0)
if [ "$LATEST" -lt "$TRAIN_ITERS" ]; then
    echo "stopped at iteration $LATEST of $TRAIN_ITERS; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
