"""Typed configuration for every part of megatron_alcot.

Each field carries the Megatron-LM flag it comes from (``arguments.py`` maps flags to fields).
Configs are validated before any compute: ``cfg.validate()`` raises :class:`ConfigError`
naming the flag and saying how to fix it.

    >>> cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1000)
    >>> cfg.validate(ParallelConfig(tensor_model_parallel_size=2))
    >>> cfg.padded_vocab_size(tp=2)
    1024
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

LATENT_METHODS = ("vanilla", "alcot", "loop", "pause", "ponder")
LATENT_READOUTS = ("hidden", "prob")
LATENT_LOSS_SCOPES = ("continued", "decided")
ATTENTION_BACKENDS = ("auto", "sdpa", "unfused", "flex")
GEMM_BACKENDS = ("auto", "torch", "onednn")


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the flag and the fix."""


def _has_onednn() -> bool:
    import torch
    return torch.backends.mkldnn.is_available()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


PIPELINE_SCHEDULES = ("1f1b", "gpipe")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{_flag(name)} {value!r} is unknown; choose one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    """LLaMA shape plus the latent-step method (docs/method.md). Defaults are a tiny CPU model."""

    num_layers: int = 2                       # --num-layers
    hidden_size: int = 64                     # --hidden-size
    ffn_hidden_size: Optional[int] = None     # --ffn-hidden-size; None: LLaMA's 8/3·h rounded up to 64
    num_attention_heads: int = 4              # --num-attention-heads
    num_query_groups: Optional[int] = None    # --num-query-groups (GQA); None: = heads (MHA)
    kv_channels: Optional[int] = None         # --kv-channels; None: hidden / heads
    vocab_size: int = 1024                    # true vocabulary size (from the tokenizer)
    make_vocab_size_divisible_by: int = 128   # --make-vocab-size-divisible-by
    seq_length: int = 128                     # --seq-length
    max_position_embeddings: Optional[int] = None  # --max-position-embeddings; None: seq_length
    rotary_base: float = 10000.0              # --rotary-base (HF rope_theta)
    norm_epsilon: float = 1e-5                # --norm-epsilon
    untie_embeddings_and_output_weights: bool = False  # --untie-embeddings-and-output-weights; tied, as the CLI
    init_method_std: Optional[float] = None   # --init-method-std; None: sqrt(2/(5·h)) (PonderLM-2)
    scale_output_init: bool = True            # divide linear_proj/linear_fc2 init std by sqrt(2·L)
    attention_dropout: float = 0.0            # --attention-dropout
    hidden_dropout: float = 0.0               # --hidden-dropout
    attention_backend: str = "auto"           # --attention-backend {auto,sdpa,unfused,flex} (model/attention_backends.py)
    cpu_gemm_backend: str = "auto"            # --cpu-gemm-backend {auto,torch,onednn} (parallel/tensor_parallel/gemm.py)
    params_dtype: str = "float32"             # parameter storage dtype ("float32", "bfloat16", "float16")

    # --- latent steps (docs/method.md); every value is a --latent-* flag ---
    latent_method: str = "alcot"              # --latent-method {vanilla,alcot,loop,pause,ponder}
    latent_max_steps: int = 3                 # --latent-max-steps (ℓmax; K for the baselines)
    latent_threshold: float = 0.1             # --latent-threshold (τ, halting threshold on reach)
    latent_router_init_prob: float = 0.9      # --latent-router-init-prob (initial continue prob g)
    latent_loss_weight: float = 0.03          # --latent-loss-weight (λ)
    latent_loss_beta: float = 1.0             # --latent-loss-beta (β)
    latent_loss_scope: str = "continued"      # --latent-loss-scope {continued,decided}: penalise k < ℓ_t, or every decision incl. the halting one
    latent_readout: str = "hidden"            # --latent-readout {hidden,prob}
    latent_embed_scale: Optional[float] = None  # --latent-embed-scale; None: sqrt(2.5·h), pause/ponder sqrt(h)
    latent_prob_chunk: Optional[int] = None   # --latent-prob-chunk (rows per no-grad target-prob chunk; None: by device)
    cross_entropy_loss_fusion: bool = True    # --no-cross-entropy-loss-fusion: LM head + CE in cache-sized row chunks, no [n, V] logits

    # --- derived ---------------------------------------------------------------
    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return int(math.ceil(8 * self.hidden_size / 3 / 64) * 64)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def init_std(self) -> float:
        if self.init_method_std is not None:
            return self.init_method_std
        return math.sqrt(2.0 / (5.0 * self.hidden_size))

    @property
    def embed_scale(self) -> float:
        """Step-0 input scale s: token inputs and fed-back hidden states are both ~unit RMS."""
        if self.latent_embed_scale is not None:
            return self.latent_embed_scale or 1.0
        if self.latent_method == "vanilla":
            return 1.0
        if self.latent_method in ("pause", "ponder"):
            return math.sqrt(self.hidden_size)   # the reference baselines scale by sqrt(d)
        return math.sqrt(2.5 * self.hidden_size)

    @property
    def max_latent_steps(self) -> int:
        """Extra steps per token: 0 for vanilla, ℓmax (or K) otherwise."""
        return 0 if self.latent_method == "vanilla" else self.latent_max_steps

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def validate(self, parallel: "ParallelConfig | None" = None) -> None:
        """Raise ConfigError (naming the flag) for any inconsistent value; no compute happens first."""
        positive = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length",
                    "make_vocab_size_divisible_by")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("ffn_hidden_size", "num_query_groups", "kv_channels", "init_method_std", "latent_prob_chunk"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{_flag(name)} must be positive when set, got {value}")
        if self.norm_epsilon <= 0 or self.rotary_base <= 0:
            raise ConfigError(f"--norm-epsilon ({self.norm_epsilon}) and --rotary-base "
                              f"({self.rotary_base}) must be positive")
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{_flag(name)} must lie in [0, 1), got {getattr(self, name)}")
        if self.latent_embed_scale is not None and self.latent_embed_scale < 0:
            raise ConfigError(f"--latent-embed-scale must be >= 0 (0 disables scaling), "
                              f"got {self.latent_embed_scale}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                f"{self.num_attention_heads}; pick a head count that divides it or set --kv-channels")
        if self.head_dim % 2:
            raise ConfigError(f"head dim {self.head_dim} must be even for rotary embeddings "
                              "(--hidden-size / --num-attention-heads, or --kv-channels)")
        if self.num_attention_heads % self.query_groups:
            raise ConfigError(
                f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                f"--num-query-groups {self.query_groups}")
        for name, choices in (("attention_backend", ATTENTION_BACKENDS), ("cpu_gemm_backend", GEMM_BACKENDS),
                              ("latent_method", LATENT_METHODS), ("latent_readout", LATENT_READOUTS),
                              ("latent_loss_scope", LATENT_LOSS_SCOPES)):
            _check_choice(name, getattr(self, name), choices)
        if self.cpu_gemm_backend == "onednn" and not _has_onednn():
            raise ConfigError("--cpu-gemm-backend onednn: this torch build has no oneDNN "
                              "(torch.backends.mkldnn.is_available() is False); use auto or torch")
        if self.latent_max_steps < 0:
            raise ConfigError(f"--latent-max-steps must be >= 0, got {self.latent_max_steps}")
        if self.latent_method in ("loop", "pause", "ponder") and self.latent_max_steps < 1:
            raise ConfigError(f"--latent-method {self.latent_method} needs --latent-max-steps >= 1 "
                              f"(K extra steps), got {self.latent_max_steps}")
        if not 0.0 < self.latent_threshold < 1.0:
            raise ConfigError(f"--latent-threshold (τ) must lie in (0, 1), got {self.latent_threshold}")
        if not 0.0 < self.latent_router_init_prob < 1.0:
            raise ConfigError("--latent-router-init-prob must lie in (0, 1), "
                              f"got {self.latent_router_init_prob}")
        if self.latent_loss_weight < 0 or self.latent_loss_beta < 0:
            raise ConfigError("--latent-loss-weight (λ) and --latent-loss-beta (β) must be >= 0")
        if self.params_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"params dtype {self.params_dtype!r} must be float32, bfloat16 or float16")
        if self.max_positions < self.seq_length:
            raise ConfigError(f"--max-position-embeddings {self.max_positions} is smaller than "
                              f"--seq-length {self.seq_length}")
        if parallel is not None:
            tp = parallel.tensor_model_parallel_size
            if self.num_attention_heads % tp:
                raise ConfigError(
                    f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                    f"--tensor-model-parallel-size {tp}")
            if self.query_groups % tp:
                raise ConfigError(
                    f"--num-query-groups {self.query_groups} is not divisible by "
                    f"--tensor-model-parallel-size {tp}; use a TP size that divides the KV heads")
            if self.ffn_size % tp:
                raise ConfigError(f"--ffn-hidden-size {self.ffn_size} is not divisible by "
                                  f"--tensor-model-parallel-size {tp}")
            if parallel.sequence_parallel and self.seq_length % tp:
                raise ConfigError(f"--sequence-parallel needs --seq-length {self.seq_length} "
                                  f"divisible by --tensor-model-parallel-size {tp}")
            pp = parallel.pipeline_model_parallel_size
            if self.num_layers < pp:
                raise ConfigError(f"--num-layers {self.num_layers} is smaller than "
                                  f"--pipeline-model-parallel-size {pp}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ParallelConfig:
    """How the world is cut: TP × PP × DP (DP is whatever is left of the world size)."""

    tensor_model_parallel_size: int = 1       # --tensor-model-parallel-size
    pipeline_model_parallel_size: int = 1     # --pipeline-model-parallel-size
    pipeline_layer_split: Optional[str] = None  # --pipeline-layer-split "3,5": layers per stage (None: even)
    pipeline_schedule: str = "1f1b"           # --pipeline-schedule {1f1b,gpipe}: order of forward and backward laps
    pipeline_max_in_flight: Optional[int] = None  # --pipeline-max-in-flight N: live micro-batches per stage (None: 2·PP)
    num_layers_per_virtual_pipeline_stage: Optional[int] = None  # --num-layers-per-virtual-pipeline-stage (not built)
    sequence_parallel: bool = False           # --sequence-parallel
    use_distributed_optimizer: bool = False   # --use-distributed-optimizer (ZeRO-1/2)
    zero_stage: int = 1                       # --zero-stage (with --use-distributed-optimizer): 1 shards optimizer state, 2 also gradients
    deepspeed_config: Optional[str] = None    # --deepspeed-config PATH: train through the DeepSpeed engine (DP only)
    distributed_backend: str = "auto"         # --distributed-backend {auto,gloo,nccl}
    distributed_timeout_minutes: int = 10     # --distributed-timeout-minutes

    def validate(self, world_size: int = 1) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} × "
                f"--pipeline-model-parallel-size {pp}; launch a multiple of {tp * pp} processes")
        _check_choice("pipeline_schedule", self.pipeline_schedule, PIPELINE_SCHEDULES)
        if self.pipeline_max_in_flight is not None and self.pipeline_max_in_flight < 1:
            raise ConfigError(f"--pipeline-max-in-flight {self.pipeline_max_in_flight}: give at least 1 "
                              "(or leave it out: twice as many micro-batches as pipeline stages)")
        if self.num_layers_per_virtual_pipeline_stage is not None:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage: interleaved virtual pipeline stages "
                              "are not implemented; the lap ring already keeps up to PP micro-batches in "
                              "flight. Leave the flag out (--pipeline-schedule 1f1b is the default)")
        if self.sequence_parallel and tp == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.zero_stage not in (1, 2):
            raise ConfigError(f"--zero-stage {self.zero_stage}: use 1 (optimizer state sharded) or 2 "
                              "(gradients too); DeepSpeed offers stage 3")
        if self.distributed_backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"--distributed-backend {self.distributed_backend!r}: use auto, gloo or nccl")

    def validate_layer_split(self, num_layers: int) -> None:
        """``--pipeline-layer-split``: one count >= 1 per stage, summing to ``--num-layers``.

            >>> ParallelConfig(pipeline_model_parallel_size=2, pipeline_layer_split="3,5").validate_layer_split(8)
        """
        if self.pipeline_layer_split is None:
            return
        split, pp = self.pipeline_layer_split, self.pipeline_model_parallel_size
        try:
            counts = [int(x) for x in split.replace(" ", "").split(",")]
        except ValueError:
            raise ConfigError(f"--pipeline-layer-split {split!r}: give one layer count per stage, "
                              "comma-separated, e.g. 3,5") from None
        if len(counts) != pp:
            raise ConfigError(f"--pipeline-layer-split {split} has {len(counts)} entries; give one per "
                              f"stage (--pipeline-model-parallel-size {pp})")
        if min(counts) < 1 or sum(counts) != num_layers:
            raise ConfigError(f"--pipeline-layer-split {split}: every stage needs >= 1 layer and the "
                              f"counts must sum to --num-layers {num_layers}")

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)


@dataclass
class DataConfig:
    """Where samples come from (Megatron's data flags, docs/data_format.md §3)."""

    data_path: list = field(default_factory=list)        # --data-path [w1] p1 [w2 p2 ...]
    split: str = "969,30,1"                             # --split
    train_data_path: list = field(default_factory=list)  # --train-data-path (exclusive with --split)
    valid_data_path: list = field(default_factory=list)  # --valid-data-path
    test_data_path: list = field(default_factory=list)   # --test-data-path
    data_cache_path: Optional[str] = None               # --data-cache-path
    mock_data: bool = False                             # --mock-data
    tokenizer_type: str = "NullTokenizer"               # --tokenizer-type
    tokenizer_model: Optional[str] = None               # --tokenizer-model
    vocab_size: Optional[int] = None                    # --vocab-size (NullTokenizer)
    reset_position_ids: bool = False                    # --reset-position-ids
    reset_attention_mask: bool = False                  # --reset-attention-mask
    eod_mask_loss: bool = False                         # --eod-mask-loss
    num_workers: int = 2                                # --num-workers (DataLoader workers)
    mmap_bin_files: bool = True                         # --no-mmap-bin-files turns it off
    mid_level_dataset_surplus: float = 0.005            # --mid-level-dataset-surplus (blend components)


LR_DECAY_STYLES = ("cosine", "linear", "constant")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass
class OptimizerConfig:
    """AdamW and its learning-rate schedule (Megatron semantics, docs/architecture.md §2).

        >>> OptimizerConfig(lr=3e-4, min_lr=3e-5, lr_warmup_fraction=0.02).validate(train_iters=50000)
    """

    optimizer: str = "adam"                   # --optimizer {adam} (AdamW: decoupled weight decay)
    lr: float = 3e-4                          # --lr (peak)
    min_lr: float = 0.0                       # --min-lr (floor after decay)
    lr_decay_style: str = "cosine"            # --lr-decay-style {cosine,linear,constant}
    lr_decay_iters: Optional[int] = None      # --lr-decay-iters; None: the whole run
    lr_warmup_iters: int = 0                  # --lr-warmup-iters
    lr_warmup_fraction: Optional[float] = None  # --lr-warmup-fraction (of the decay iterations)
    lr_warmup_init: float = 0.0               # --lr-warmup-init (LR at iteration 0)
    weight_decay: float = 0.01                # --weight-decay (not applied to norms, biases, 1-D params)
    adam_beta1: float = 0.9                   # --adam-beta1
    adam_beta2: float = 0.999                 # --adam-beta2
    adam_eps: float = 1e-8                    # --adam-eps
    clip_grad: float = 1.0                    # --clip-grad (global L2 norm; 0 disables)

    def warmup_iters(self, decay_iters: int) -> int:
        if self.lr_warmup_fraction is not None:
            return int(self.lr_warmup_fraction * decay_iters)
        return self.lr_warmup_iters

    def validate(self, train_iters: Optional[int] = None) -> None:
        if self.optimizer != "adam":
            raise ConfigError(f"--optimizer {self.optimizer!r} is not supported; use adam (AdamW)")
        if self.lr < 0 or self.min_lr < 0:
            raise ConfigError("--lr and --min-lr must be >= 0")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        _check_choice("lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        if self.lr_warmup_fraction is not None:
            if self.lr_warmup_iters:
                raise ConfigError("--lr-warmup-fraction and --lr-warmup-iters are exclusive; give one")
            if not 0.0 <= self.lr_warmup_fraction <= 1.0:
                raise ConfigError(f"--lr-warmup-fraction must lie in [0, 1], got {self.lr_warmup_fraction}")
        if self.lr_warmup_iters < 0:
            raise ConfigError(f"--lr-warmup-iters must be >= 0, got {self.lr_warmup_iters}")
        decay = self.lr_decay_iters if self.lr_decay_iters is not None else train_iters
        if self.lr_decay_iters is not None and self.lr_decay_iters <= 0:
            raise ConfigError(f"--lr-decay-iters must be positive, got {self.lr_decay_iters}")
        if decay is not None and self.warmup_iters(decay) > decay:
            raise ConfigError(f"warm-up ({self.warmup_iters(decay)} iterations, --lr-warmup-iters/"
                              f"--lr-warmup-fraction) is longer than the decay ({decay}, --lr-decay-iters)")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{_flag(name)} must lie in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ConfigError(f"--adam-eps must be positive, got {self.adam_eps}")
        if self.clip_grad < 0:
            raise ConfigError(f"--clip-grad must be >= 0 (0 disables clipping), got {self.clip_grad}")


@dataclass
class TrainConfig:
    """Batching, length of the run, precision, recompute, checkpoints and exits.

    ``train_iters`` is the run length; ``--train-samples`` is converted to it in ``arguments.py``.

        >>> TrainConfig(micro_batch_size=4, global_batch_size=256, train_iters=100).validate(dp=8)
        >>> TrainConfig(micro_batch_size=4, global_batch_size=256).num_micro_batches(dp=8)
        8
    """

    micro_batch_size: int = 1                 # --micro-batch-size
    global_batch_size: Optional[int] = None   # --global-batch-size; None: micro × dp
    train_iters: Optional[int] = None         # --train-iters
    train_samples: Optional[int] = None       # --train-samples (exclusive with --train-iters)
    seed: int = 1234                          # --seed
    bf16: bool = False                        # --bf16 (fp32 params + grads, bf16 autocast compute)
    fp16: bool = False                        # --fp16 (fp32 params, fp16 autocast, dynamic loss scale)
    loss_scale: Optional[float] = None        # --loss-scale (static; None: dynamic with --fp16)
    initial_loss_scale: float = 2.0 ** 32     # --initial-loss-scale
    min_loss_scale: float = 1.0               # --min-loss-scale
    loss_scale_window: int = 1000             # --loss-scale-window
    hysteresis: int = 2                       # --hysteresis
    recompute_granularity: Optional[str] = None  # --recompute-granularity {full,selective}
    recompute_method: Optional[str] = None    # --recompute-method {uniform,block}
    recompute_num_layers: Optional[int] = None  # --recompute-num-layers
    overlap_grad_reduce: bool = True          # --no-overlap-grad-reduce turns it off
    ddp_bucket_size_mb: float = 25.0          # --ddp-bucket-size-mb (fp32 gradient bucket size)
    overlap_param_gather: bool = False        # --overlap-param-gather (ZeRO: all-gather overlaps the next forward)
    grad_reduce_in_bf16: bool = False         # --grad-reduce-in-bf16 (gradient buckets travel in bf16)
    eval_interval: int = 1000                 # --eval-interval
    eval_iters: int = 100                     # --eval-iters (0 disables validation)
    save: Optional[str] = None                # --save
    load: Optional[str] = None                # --load
    save_interval: Optional[int] = None       # --save-interval
    no_load_optim: bool = False               # --no-load-optim
    no_load_rng: bool = False                 # --no-load-rng
    finetune: bool = False                    # --finetune (load weights only, iteration restarts at 0)
    exit_signal_handler: bool = False         # --exit-signal-handler (on --exit-signal: finish the step, save, exit 0)
    exit_signal: str = "SIGTERM"              # --exit-signal {SIGTERM,SIGINT,SIGUSR1,SIGUSR2} the handler waits for
    keep_last_checkpoints: Optional[int] = None  # --keep-last-checkpoints (delete older complete checkpoints; None keeps all)
    exit_duration_in_mins: Optional[float] = None  # --exit-duration-in-mins
    exit_interval: Optional[int] = None       # --exit-interval (stop when iteration % N == 0)
    max_nan_skips: int = 10                   # --max-nan-skips (consecutive NaN/Inf steps before stopping)
    peak_flops: Optional[float] = None        # --peak-flops (TFLOP/s per device, for MFU)
    deterministic: bool = False               # --deterministic (torch.use_deterministic_algorithms)
    torch_compile: bool = False               # --torch-compile (compile each transformer layer with torch.compile)

    def resolved_global_batch(self, dp: int) -> int:
        return self.global_batch_size if self.global_batch_size is not None else self.micro_batch_size * dp

    def num_micro_batches(self, dp: int) -> int:
        return self.resolved_global_batch(dp) // (self.micro_batch_size * dp)

    def resolved_train_iters(self, dp: int) -> int:
        if self.train_iters is not None:
            return self.train_iters
        gbs = self.resolved_global_batch(dp)
        return (self.train_samples + gbs - 1) // gbs

    def validate(self, dp: int = 1) -> None:
        if self.micro_batch_size <= 0:
            raise ConfigError(f"--micro-batch-size must be positive, got {self.micro_batch_size}")
        gbs = self.resolved_global_batch(dp)
        if gbs <= 0 or gbs % (self.micro_batch_size * dp):
            raise ConfigError(
                f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
                f"{self.micro_batch_size} × data-parallel size {dp}; use a multiple of "
                f"{self.micro_batch_size * dp}")
        if (self.train_iters is None) == (self.train_samples is None):
            raise ConfigError("give exactly one of --train-iters and --train-samples")
        if self.train_iters is not None and self.train_iters < 0:
            raise ConfigError(f"--train-iters must be >= 0, got {self.train_iters}")
        if self.train_samples is not None and self.train_samples < 0:
            raise ConfigError(f"--train-samples must be >= 0, got {self.train_samples}")
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 and --fp16 are exclusive; pick one")
        if self.loss_scale is not None and self.loss_scale <= 0:
            raise ConfigError(f"--loss-scale must be positive, got {self.loss_scale}")
        if self.initial_loss_scale <= 0 or self.min_loss_scale <= 0:
            raise ConfigError("--initial-loss-scale and --min-loss-scale must be positive")
        if self.loss_scale_window <= 0 or self.hysteresis <= 0:
            raise ConfigError("--loss-scale-window and --hysteresis must be positive")
        if self.recompute_granularity not in (None,) + RECOMPUTE_GRANULARITIES:
            raise ConfigError(f"--recompute-granularity {self.recompute_granularity!r} is unknown; "
                              f"choose one of {', '.join(RECOMPUTE_GRANULARITIES)}")
        if self.recompute_method not in (None,) + RECOMPUTE_METHODS:
            raise ConfigError(f"--recompute-method {self.recompute_method!r} is unknown; "
                              f"choose one of {', '.join(RECOMPUTE_METHODS)}")
        if self.recompute_method is not None and self.recompute_granularity != "full":
            raise ConfigError("--recompute-method needs --recompute-granularity full")
        if self.recompute_num_layers is not None:
            if self.recompute_method is None:
                raise ConfigError("--recompute-num-layers needs --recompute-method uniform or block")
            if self.recompute_num_layers <= 0:
                raise ConfigError(f"--recompute-num-layers must be positive, got {self.recompute_num_layers}")
        if self.ddp_bucket_size_mb <= 0:
            raise ConfigError(f"--ddp-bucket-size-mb must be positive, got {self.ddp_bucket_size_mb}")
        for name in ("eval_interval", "save_interval", "exit_interval"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{_flag(name)} must be positive, got {value}")
        if self.eval_iters < 0:
            raise ConfigError(f"--eval-iters must be >= 0, got {self.eval_iters}")
        if self.save_interval is not None and self.save is None:
            raise ConfigError("--save-interval needs --save DIR")
        if (self.exit_signal_handler or self.exit_duration_in_mins) and self.save is None:
            raise ConfigError("--exit-signal-handler and --exit-duration-in-mins save before exiting; "
                              "give --save DIR")
        if self.exit_duration_in_mins is not None and self.exit_duration_in_mins <= 0:
            raise ConfigError(f"--exit-duration-in-mins must be positive, got {self.exit_duration_in_mins}")
        if self.keep_last_checkpoints is not None:
            if self.keep_last_checkpoints < 1:
                raise ConfigError(f"--keep-last-checkpoints must be >= 1, got {self.keep_last_checkpoints}")
            if self.save is None:
                raise ConfigError("--keep-last-checkpoints needs --save DIR")
        if self.max_nan_skips < 1:
            raise ConfigError(f"--max-nan-skips must be >= 1, got {self.max_nan_skips}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"--peak-flops (TFLOP/s per device) must be positive, got {self.peak_flops}")


@dataclass
class LoggingConfig:
    """What the loop reports and where (console on rank 0, TensorBoard, a JSON-lines metrics file)."""

    log_interval: int = 100                   # --log-interval
    tensorboard_dir: Optional[str] = None     # --tensorboard-dir
    metrics_file: Optional[str] = None        # --metrics-file (JSON lines, one per logged iteration / evaluation)
    log_timers: bool = False                  # --timing-log (per-phase timers on the console line)
    quiet: bool = False                       # --quiet (no console lines; history still recorded)

    def validate(self) -> None:
        if self.log_interval <= 0:
            raise ConfigError(f"--log-interval must be positive, got {self.log_interval}")
        if self.metrics_file is not None and os.path.isdir(self.metrics_file):
            raise ConfigError(f"--metrics-file {self.metrics_file} is a directory; give a file path "
                              "(e.g. logs/metrics.jsonl)")
