"""ModelConfig: the LLaMA shape and the latent-step method (docs/method.md).

    >>> cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1000)
    >>> cfg.validate(ParallelConfig(tensor_model_parallel_size=2))
    >>> cfg.padded_vocab_size(tp=2)
    1024
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

from megatron_alcot.config.fields import ConfigError, check_choice, flag, flag_of, internal
from megatron_alcot.config.parallel import ParallelConfig

LATENT_METHODS = ("vanilla", "alcot", "loop", "pause", "ponder")
LATENT_READOUTS = ("hidden", "prob")
LATENT_LOSS_SCOPES = ("continued", "decided")
ATTENTION_BACKENDS = ("auto", "sdpa", "unfused", "flex")
GEMM_BACKENDS = ("auto", "torch", "onednn")


def _has_onednn() -> bool:
    import torch
    return torch.backends.mkldnn.is_available()



@dataclass
class ModelConfig:
    """LLaMA shape plus the latent-step method (docs/method.md). Defaults are a tiny CPU model."""

    num_layers: int = flag("--num-layers", default=2, help="transformer layers (shared by every latent step)")
    hidden_size: int = flag("--hidden-size", default=64, help="model width h")
    ffn_hidden_size: Optional[int] = flag(
        "--ffn-hidden-size", default=None, help="SwiGLU inner width (default: LLaMA's 8/3·h rounded up to 64)")
    num_attention_heads: int = flag("--num-attention-heads", default=4, help="attention (query) heads")
    num_query_groups: Optional[int] = flag(
        "--num-query-groups", default=None,
        help="key/value heads for grouped-query attention; must divide the heads (default: one per head, MHA)")
    kv_channels: Optional[int] = flag("--kv-channels", default=None,
                                      help="head dimension (default: hidden size / heads)")
    vocab_size: int = internal(1024, why="the tokenizer's true vocabulary size, set after it is built")
    make_vocab_size_divisible_by: int = flag(
        "--make-vocab-size-divisible-by", default=128,
        help="pad the embedding and LM head rows to a multiple of this × the tensor-parallel size")
    seq_length: int = flag("--seq-length", default=128, help="tokens per training sample")
    max_position_embeddings: Optional[int] = flag(
        "--max-position-embeddings", default=None,
        help="longest RoPE position the model serves (default: --seq-length)")
    rotary_base: float = flag("--rotary-base", default=10000.0, help="RoPE base θ (Hugging Face rope_theta)")
    norm_epsilon: float = flag("--norm-epsilon", default=1e-5, help="RMSNorm epsilon")
    untie_embeddings_and_output_weights: bool = flag(
        "--untie-embeddings-and-output-weights", default=False,
        help="give the LM head its own weights (default: tied to the input embedding, as Megatron-LM)")
    init_method_std: Optional[float] = flag(
        "--init-method-std", default=None,
        help="std of the normal weight init (default: sqrt(2/(5·h)), so that token and latent inputs "
             "are both ~unit RMS)")
    scale_output_init: bool = internal(True, why="on for training: linear_proj/linear_fc2 init std / sqrt(2·L)")
    attention_dropout: float = flag("--attention-dropout", default=0.0, help="dropout on attention weights")
    hidden_dropout: float = flag("--hidden-dropout", default=0.0, help="dropout on each residual branch")
    attention_backend: str = flag(
        "--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
        help="attention core: auto picks the fastest one measured on this machine (model/attention_backends.py)")
    cpu_gemm_backend: str = flag(
        "--cpu-gemm-backend", default="auto", choices=GEMM_BACKENDS,
        help="library of the fp32 CPU matrix products: auto picks the faster one measured on this machine "
             "(parallel/tensor_parallel/gemm.py)")
    params_dtype: str = internal("float32", why="parameters are stored in fp32; --bf16/--fp16 set autocast")

    # --- latent steps (docs/method.md) ---------------------------------------
    latent_method: str = flag(
        "--latent-method", default="alcot", choices=LATENT_METHODS,
        help="vanilla: no latent steps; alcot: adaptive per-token steps with learned routers; loop, pause, "
             "ponder: the fixed-K baselines")
    latent_max_steps: int = flag(
        "--latent-max-steps", default=3,
        help="ℓmax: most latent steps a token may take (K, the fixed count, for loop/pause/ponder)")
    latent_threshold: float = flag(
        "--latent-threshold", default=0.1, help="τ: step k+1 runs while the token's reach r is at least τ")
    latent_router_init_prob: float = flag(
        "--latent-router-init-prob", default=0.9, help="initial continue probability g of every router")
    latent_loss_weight: float = flag(
        "--latent-loss-weight", default=0.03, help="λ of the correctness-aware latent loss (more: more pruning)")
    latent_loss_beta: float = flag(
        "--latent-loss-beta", default=1.0, help="β of the latent loss (more: less pruning)")
    latent_loss_scope: str = flag(
        "--latent-loss-scope", default="continued", choices=LATENT_LOSS_SCOPES,
        help="continued: penalise the decisions k < ℓ_t where the token goes on; decided: every router "
             "decision including the one that halts it")
    latent_readout: str = flag(
        "--latent-readout", default="hidden", choices=LATENT_READOUTS,
        help="hidden: LM head on the exit-weighted hidden states Σ e_k h_k; prob: mixture of the per-step "
             "distributions")
    latent_embed_scale: Optional[float] = flag(
        "--latent-embed-scale", default=None,
        help="step-0 input scale s (0: none; default: sqrt(2.5·h), sqrt(h) for pause/ponder, 1 for vanilla)")
    latent_prob_chunk: Optional[int] = flag(
        "--latent-prob-chunk", default=None,
        help="rows per chunk of the no-grad target probabilities of --latent-readout prob (default: by device)")
    cross_entropy_loss_fusion: bool = flag(
        "--cross-entropy-loss-fusion", off="--no-cross-entropy-loss-fusion", default=True,
        help="LM head and cross entropy in cache-sized row chunks, never the [tokens, vocab] logits")

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
                raise ConfigError(f"{flag_of(self, name)} must be positive, got {getattr(self, name)}")
        for name in ("ffn_hidden_size", "num_query_groups", "kv_channels", "init_method_std", "latent_prob_chunk"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{flag_of(self, name)} must be positive when set, got {value}")
        if self.norm_epsilon <= 0 or self.rotary_base <= 0:
            raise ConfigError(f"--norm-epsilon ({self.norm_epsilon}) and --rotary-base "
                              f"({self.rotary_base}) must be positive")
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{flag_of(self, name)} must lie in [0, 1), got {getattr(self, name)}")
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
        for name in ("attention_backend", "cpu_gemm_backend", "latent_method", "latent_readout",
                     "latent_loss_scope"):
            check_choice(self, name)
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

