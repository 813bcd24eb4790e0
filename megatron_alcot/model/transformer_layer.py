"""LLaMA building blocks on the tensor-parallel layers: RMSNorm, SwiGLU MLP, transformer layer,
and the name-driven weight initialisation.

    norm = RMSNorm(hidden, eps=1e-5)                      # F.rms_norm, eps on the variance (as HF)
    layer = TransformerLayer(cfg, spec, sequence_parallel=False)  # spec = build_layer_spec(cfg)
    rows, k, v = layer(rows, ctx, past_keys, past_values)  # rows [n, h] (compacted), see attention.py
    init_parameters(model, cfg, seed=1234)

Parameter names follow Megatron core (``input_layernorm``, ``self_attention.linear_qkv``,
``self_attention.linear_proj``, ``pre_mlp_layernorm``, ``mlp.linear_fc1`` = ``[gate; up]``,
``mlp.linear_fc2``); no biases.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from megatron_alcot.model.attention import LapContext, SelfAttention
from megatron_alcot.parallel import parallel_state
from megatron_alcot.parallel.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_alcot.parallel.tensor_parallel.sharding import shard_tensor


def skip_init(tensor):
    """Placeholder init for the TP layers: :func:`init_parameters` fills every weight afterwards."""
    return tensor


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · weight``; with ``sequence_parallel`` its weight gradient is
    partial per TP rank (``weight.sequence_parallel``) and must be summed over TP."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype=torch.float32,
                 sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        if sequence_parallel:
            self.weight.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLUMLP(nn.Module):
    """``fc2(silu(gate) · up)`` with ``[gate; up] = fc1(x)`` (column-parallel, stride 2)."""

    def __init__(self, cfg, spec, sequence_parallel: bool = False):
        super().__init__()
        dtype = getattr(torch, cfg.params_dtype)
        self.linear_fc1 = ColumnParallelLinear(
            cfg.hidden_size, 2 * cfg.ffn_size, bias=False, gather_output=False, init_method=skip_init,
            stride=2, sequence_parallel=sequence_parallel, params_dtype=dtype,
            gemm_backend=spec.gemm)
        self.linear_fc2 = RowParallelLinear(
            cfg.ffn_size, cfg.hidden_size, bias=False, input_is_parallel=True, init_method=skip_init,
            sequence_parallel=sequence_parallel, params_dtype=dtype, gemm_backend=spec.gemm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class TransformerLayer(nn.Module):
    """Pre-norm LLaMA layer on compacted rows; returns this lap's keys/values for reuse. ``spec``
    (``spec.LayerSpec``) holds the attention core and GEMM library, resolved once for the model."""

    def __init__(self, cfg, spec, sequence_parallel: bool = False):
        super().__init__()
        dtype = getattr(torch, cfg.params_dtype)
        self.hidden_dropout = cfg.hidden_dropout
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, dtype, sequence_parallel)
        self.self_attention = SelfAttention(cfg, spec, init_method=skip_init, output_init_method=skip_init,
                                            sequence_parallel=sequence_parallel)
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, dtype, sequence_parallel)
        self.mlp = SwiGLUMLP(cfg, spec, sequence_parallel)

    def _dropout(self, x):
        if self.hidden_dropout > 0 and self.training:
            return F.dropout(x, self.hidden_dropout)
        return x

    def forward(self, x: torch.Tensor, ctx: LapContext, past_keys=(), past_values=()):
        attn, k, v = self.self_attention(self.input_layernorm(x), ctx, past_keys, past_values)
        x = x + self._dropout(attn)
        x = x + self._dropout(self.mlp(self.pre_mlp_layernorm(x)))
        return x, k, v


# --- initialisation ---------------------------------------------------------------------------
_OUTPUT_PROJECTIONS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_VOCAB_WEIGHTS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _param_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))


@torch.no_grad()
def init_parameters(model: nn.Module, cfg, seed: int) -> None:
    """Fill every parameter from its name alone, so TP and PP layouts start from the same weights.

    Each weight draws its FULL (TP = 1) value from a generator seeded by ``(seed, name)`` and keeps
    this rank's shard: truncated normal (±3σ) with ``cfg.init_std``, divided by ``sqrt(2L)`` for
    ``linear_proj``/``linear_fc2`` when ``cfg.scale_output_init``; vocabulary rows beyond the true
    vocabulary are zero; norms are one; routers get weight 0 and bias ``logit(g_init)``.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight"):
            param.fill_(1.0)
            continue
        if name.startswith("latent.routers."):
            p = cfg.latent_router_init_prob
            param.fill_(math.log(p / (1.0 - p)) if name.endswith(".bias") else 0.0)
            continue
        if not name.endswith(".weight") or param.dim() != 2:
            continue  # other latent parameters initialise themselves
        std = cfg.init_std
        if cfg.scale_output_init and name.endswith(_OUTPUT_PROJECTIONS):
            std = std / math.sqrt(2.0 * cfg.num_layers)
        shape = list(param.shape)
        parallel = getattr(param, "tensor_model_parallel", False)
        if parallel:
            shape[param.partition_dim] *= tp
        full = torch.zeros(shape, dtype=torch.float32)
        target = full[: cfg.vocab_size] if name in _VOCAB_WEIGHTS else full
        if getattr(param, "shared_embedding", False):
            name = "embedding.word_embeddings.weight"
        nn.init.trunc_normal_(target, 0.0, std, -3 * std, 3 * std, generator=_param_generator(seed, name))
        if parallel:
            full = shard_tensor(full, param.partition_dim, param.partition_stride, rank, tp)
        param.copy_(full)
