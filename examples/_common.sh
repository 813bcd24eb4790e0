# Shared by the pretrain_*.sh examples: the paper's recipe (AdamW β=(0.9,0.95), cosine to 10 %,
# 2 % warm-up, weight decay 0.1, global batch 256 × 2048 tokens, 50k iterations, bf16).
# Override any of these in the environment before calling a script.
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
DATA_PATH=${DATA_PATH:-data/pile_text_document}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-HuggingFaceTokenizer}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-EleutherAI/pythia-410m}
CKPT_DIR=${CKPT_DIR:-checkpoints/$RUN_NAME}
TB_DIR=${TB_DIR:-tensorboard/$RUN_NAME}
METRICS_FILE=${METRICS_FILE:-logs/${RUN_NAME}_metrics.jsonl}
LATENT_METHOD=${LATENT_METHOD:-alcot}
LATENT_MAX_STEPS=${LATENT_MAX_STEPS:-3}
PEAK_FLOPS=${PEAK_FLOPS:-989}            # TFLOP/s per GPU for MFU (H100 SXM dense bf16)

COMMON_ARGS=(
    --seq-length 2048 --max-position-embeddings 2048
    --untie-embeddings-and-output-weights --normalization RMSNorm --swiglu --disable-bias-linear
    --position-embedding-type rope --rotary-base 10000 --norm-epsilon 1e-5
    --make-vocab-size-divisible-by 128
    --global-batch-size 256 --train-iters 50000
    --lr-decay-style cosine --lr-warmup-fraction 0.02
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0
    --bf16 --seed 1234
    --data-path "$DATA_PATH" --split 969,30,1 --num-workers 2
    --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL"
    --save "$CKPT_DIR" --load "$CKPT_DIR" --save-interval 1000
    --eval-interval 1000 --eval-iters 50 --log-interval 10 --tensorboard-dir "$TB_DIR"
    --metrics-file "$METRICS_FILE"
    --exit-signal-handler --max-nan-skips 10 --peak-flops "$PEAK_FLOPS"
    --latent-method "$LATENT_METHOD" --latent-max-steps "$LATENT_MAX_STEPS"
    --latent-threshold 0.1 --latent-router-init-prob 0.9 --latent-loss-weight 0.03 --latent-loss-beta 1
)

LAUNCH=(torchrun --nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
