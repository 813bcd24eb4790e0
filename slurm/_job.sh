# Shared body of slurm/pretrain_*.sh: sourced by them, never submitted by itself.
#
# The sourcing script sets RUN_NAME and MODEL_ARGS (an array of pretrain_alcot.py flags) and
# passes its own arguments on: they are appended to the command line, so the last value wins
# (e.g. `sbatch slurm/pretrain_7b.sh --train-iters 1000 --save /scratch/ckpt`).
#
# Environment (all optional except TOKENIZER_MODEL):
#   TOKENIZER_MODEL   SentencePiece model of the tokenizer (--tokenizer-model)
#   DATA_PATH         indexed dataset prefix (default data/pile_text_document); "mock" = synthetic tokens
#   CKPT_DIR          --save/--load directory (default checkpoints/$RUN_NAME)
#   KEEP_CKPTS        --keep-last-checkpoints (default 3)
#   SIGNAL_LEAD_S     seconds before the time limit at which the training tasks get SIGTERM (300)
#   DRY_RUN=1         print the srun command and the memory plan; start nothing
#   PYTHON            interpreter for the tasks (default python)
#
# Pre-emption: SIGNAL_LEAD_S before the time limit this shell sends SIGTERM to the srun step
# (`scancel --signal=TERM`: every task and its DataLoader workers, not this shell). The tasks finish
# the step, save, write $CKPT_DIR/last_exit.json {"reason": "signal"} and exit 0; this shell then
# requeues the job, which resumes from the checkpoint. `scancel --signal=TERM --full` and Slurm's
# own pre-emption signal reach this shell too: it ignores the signal and waits for srun.
# Any other ending fails the job: a crash prints the log line that says why and is not requeued.

DRY_RUN=${DRY_RUN:-0}
SIGNAL_LEAD_S=${SIGNAL_LEAD_S:-300}
PYTHON=${PYTHON:-python}
DATA_PATH=${DATA_PATH:-data/pile_text_document}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-Llama2Tokenizer}
CKPT_DIR=${CKPT_DIR:-checkpoints/$RUN_NAME}
KEEP_CKPTS=${KEEP_CKPTS:-3}
TRAIN_ITERS=${TRAIN_ITERS:-50000}

if [ -z "${TOKENIZER_MODEL:-}" ]; then
    echo "error: set TOKENIZER_MODEL to the LLaMA-2 SentencePiece model, e.g." >&2
    echo "  TOKENIZER_MODEL=/models/llama-2-7b/tokenizer.model sbatch $SCRIPT" >&2
    exit 2
fi

# megatron_alcot.parallel.launch reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID inside the srun
# step and takes the master from the first host of SLURM_JOB_NODELIST; the port is derived from the
# job id. Exported here too so that every task sees the same values.
if [ -n "${SLURM_JOB_ID:-}" ]; then
    export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
elif [ "$DRY_RUN" != 1 ]; then
    echo "error: submit this script with sbatch (or DRY_RUN=1 bash $SCRIPT to print the srun command)" >&2
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

if [ "$DATA_PATH" = mock ]; then
    DATA_ARGS=(--mock-data)
else
    DATA_ARGS=(--data-path "$DATA_PATH" --split 969,30,1)
fi
ARGS=(
    "${MODEL_ARGS[@]}" --train-iters "$TRAIN_ITERS"
    "${DATA_ARGS[@]}" --num-workers 2
    --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL"
    --save "$CKPT_DIR" --load "$CKPT_DIR" --keep-last-checkpoints "$KEEP_CKPTS"
    --metrics-file "$RUN_NAME-metrics.jsonl" --tensorboard-dir "tensorboard/$RUN_NAME"
    --exit-signal-handler --exit-signal SIGTERM --distributed-timeout-minutes 30
    "$@"
)

# The checkpoint directory the run really uses: the last --save on the command line.
SAVE_DIR=$CKPT_DIR
for ((i = 0; i < ${#ARGS[@]} - 1; i++)); do
    [ "${ARGS[i]}" = --save ] && SAVE_DIR=${ARGS[i + 1]}
done

CPUS=${SLURM_CPUS_PER_TASK:-$(sed -n 's/^#SBATCH --cpus-per-task=//p' "$SCRIPT" | head -n 1)}
# Since Slurm 22.05 srun does not inherit --cpus-per-task from the allocation: pass it on.
CMD=(srun --kill-on-bad-exit=1 --cpu-bind=none --cpus-per-task="$CPUS" "$PYTHON" pretrain_alcot.py "${ARGS[@]}")

if [ "$DRY_RUN" = 1 ]; then
    NODES=$(sed -n 's/^#SBATCH --nodes=//p' "$SCRIPT" | head -n 1)
    PER_NODE=$(sed -n 's/^#SBATCH --ntasks-per-node=//p' "$SCRIPT" | head -n 1)
    WORLD=${WORLD_SIZE:-$((NODES * PER_NODE))}
    echo "MASTER_ADDR=${MASTER_ADDR:-<first host of SLURM_JOB_NODELIST>} MASTER_PORT=${MASTER_PORT:-<20000 + SLURM_JOB_ID % 20000>}"
    for arg in "${CMD[@]}"; do       # copy-pasteable: quote only what the shell would split
        if [[ $arg =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then printf '%s ' "$arg"; else printf '%q ' "$arg"; fi
    done
    echo
    if [ -f tools/plan_memory.py ]; then
        echo "memory plan for $WORLD ranks on 80 GB GPUs:"
        "$PYTHON" tools/plan_memory.py "${ARGS[@]}" --world-size "$WORLD" --gpu-memory-gb 80
        exit $?
    fi
    echo "(no tools/plan_memory.py in this checkout: no memory plan)"
    exit 0
fi

# Only this run's ending counts: a stale record must not requeue a crashed run.
EXIT_RECORD=$SAVE_DIR/last_exit.json
rm -f "$EXIT_RECORD"
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $SLURM_NTASKS tasks, checkpoints in $SAVE_DIR"

# SIGTERM to the tasks SIGNAL_LEAD_S before the time limit (none without a limit).
END=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null)
TIMER=
if [[ $END =~ ^[0-9]{4}- ]]; then
    DELAY=$(( $(date -d "$END" +%s) - $(date +%s) - SIGNAL_LEAD_S ))
    ( sleep "$(( DELAY > 0 ? DELAY : 0 ))" && echo "$SIGNAL_LEAD_S s before the time limit: SIGTERM to the training tasks" \
        && scancel --signal=TERM "$SLURM_JOB_ID" ) &
    TIMER=$!
fi
# A signal to this shell (scancel --full, pre-emption) must not end it before srun has returned.
trap 'echo "batch shell: SIGTERM received; waiting for the training tasks to save"' TERM
trap 'echo "batch shell: SIGUSR1 received; waiting for the training tasks"' USR1

"${CMD[@]}"
RC=$?
[ -n "$TIMER" ] && kill "$TIMER" 2>/dev/null

REASON=
[ -f "$EXIT_RECORD" ] && REASON=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["reason"])' "$EXIT_RECORD")
if [ "$RC" -eq 0 ] && { [ "$REASON" = signal ] || [ "$REASON" = duration ]; }; then
    echo "stopped cleanly ($REASON) at iteration $(cat "$SAVE_DIR/latest_checkpointed_iteration.txt"); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
if [ "$RC" -eq 0 ] && [ -n "$REASON" ]; then
    echo "training ended ($REASON); not requeueing"
    exit 0
fi
OUT=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p')
WHY=
if [ -n "$OUT" ] && [ -f "$OUT" ]; then      # the task's own error line, not srun's summary
    WHY=$(grep -E 'Error|error:|Traceback|Killed|killed|signal' "$OUT" | grep -vE '^(srun|batch shell|job [0-9])' | tail -n 1)
fi
echo "error: srun exited with status $RC and no clean stop was recorded in $EXIT_RECORD; not requeueing." >&2
echo "error: why, from the log: ${WHY:-(no error line; see ${OUT:-the job output})}" >&2
exit "$(( RC == 0 ? 1 : RC ))"
