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
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

LATENT_METHODS = ("vanilla", "alcot", "loop", "pause", "ponder")
LATENT_READOUTS = ("hidden", "prob")


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the flag and the fix."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class ModelConfig:
    """LLaMA shape plus the latent-step method (DESIGN §2). Defaults are a tiny CPU model."""

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
    untie_embeddings_and_output_weights: bool = True  # --untie-embeddings-and-output-weights
    init_method_std: Optional[float] = None   # --init-method-std; None: sqrt(2/(5·h)) (PonderLM-2)
    scale_output_init: bool = True            # divide linear_proj/linear_fc2 init std by sqrt(2·L)
    attention_dropout: float = 0.0            # --attention-dropout
    hidden_dropout: float = 0.0               # --hidden-dropout
    params_dtype: str = "float32"             # parameter storage dtype ("float32", "bfloat16", "float16")

    # --- latent steps (DESIGN §2); every value is a --latent-* flag ---
    latent_method: str = "alcot"              # --latent-method {vanilla,alcot,loop,pause,ponder}
    latent_max_steps: int = 3                 # --latent-max-steps (ℓmax; K for the baselines)
    latent_threshold: float = 0.1             # --latent-threshold (τ, halting threshold on reach)
    latent_router_init_prob: float = 0.9      # --latent-router-init-prob (initial continue prob g)
    latent_loss_weight: float = 0.03          # --latent-loss-weight (λ)
    latent_loss_beta: float = 1.0             # --latent-loss-beta (β)
    latent_readout: str = "hidden"            # --latent-readout {hidden,prob}
    latent_embed_scale: Optional[float] = None  # --latent-embed-scale; None: sqrt(2.5·h); 0 disables
    latent_prob_chunk: int = 4096             # --latent-prob-chunk (rows per no-grad target-prob chunk)

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
        return math.sqrt(2.5 * self.hidden_size)

    @property
    def num_latent_steps(self) -> int:
        """Extra steps per token: 0 for vanilla, ℓmax (or K) otherwise."""
        return 0 if self.latent_method == "vanilla" else self.latent_max_steps

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def validate(self, parallel: "ParallelConfig | None" = None) -> None:
        """Raise ConfigError (naming the flag) for any inconsistent value; no compute happens first."""
        positive = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length",
                    "make_vocab_size_divisible_by", "latent_prob_chunk")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
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
        if self.latent_method not in LATENT_METHODS:
            raise ConfigError(f"--latent-method {self.latent_method!r} is unknown; "
                              f"choose one of {', '.join(LATENT_METHODS)}")
        if self.latent_readout not in LATENT_READOUTS:
            raise ConfigError(f"--latent-readout {self.latent_readout!r} is unknown; "
                              f"choose one of {', '.join(LATENT_READOUTS)}")
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
    sequence_parallel: bool = False           # --sequence-parallel
    use_distributed_optimizer: bool = False   # --use-distributed-optimizer (ZeRO-1/2)
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
        if self.sequence_parallel and tp == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.distributed_backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"--distributed-backend {self.distributed_backend!r}: use auto, gloo or nccl")

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)


@dataclass
class DataConfig:
    """Where samples come from (Megatron's data flags, DESIGN §5)."""

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
