"""GQA self-attention over the 2-D (token, step) mask, with key/value reuse across laps.

One lap computes step k for its active tokens. Its queries attend to the keys/values of the
earlier laps of the same layer (passed in, never recomputed, kept in the autograd graph) plus its
own. The rule of docs/method.md §3: query (t, k) sees key (t', k') iff t' <= t, k' <= k and (t', k') was
executed. The k' <= k part is structural (only blocks of steps <= k are passed); the rest is the
boolean mask built by :func:`attention_mask` from each block's ``order``/``valid``.

Keys/values are stored per lap in the padded layout of that lap's queries::

    kv = LapKV(order=comp.order, valid=comp.valid, keys=[k_layer0, ...], values=[...])
    # keys[i]: [b, groups_per_rank, m_k, head_dim] for local layer i

A decoding cache keyed by (layer, lap) can hold the same blocks (one per lap, appended to as
tokens arrive); a pipeline schedule can detach them at lap boundaries and feed their gradients back.

    attn = SelfAttention(cfg, spec, sequence_parallel=False)     # spec: the model's LayerSpec (spec.py)
    out_rows, k, v = attn(x_rows, ctx, past_keys, past_values)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron_alcot.model.attention_backends import AttentionCore
from megatron_alcot.model.compaction import Compaction
from megatron_alcot.model.lap_attention import LapMask
from megatron_alcot.model.rotary import apply_rotary
from megatron_alcot.parallel import parallel_state
from megatron_alcot.parallel.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


@dataclass
class LapKV:
    """The keys/values one lap produced in one stage's layers."""

    order: torch.Tensor                 # [b, m] token index of each slot
    valid: torch.Tensor                 # [b, m] bool: slot holds an executed (t, k)
    keys: List[torch.Tensor] = field(default_factory=list)    # per local layer [b, g, m, d]
    values: List[torch.Tensor] = field(default_factory=list)


@dataclass
class LapContext:
    """Everything the layers of one lap share: compaction, RoPE tables, the attention mask."""

    comp: Compaction
    cos: torch.Tensor                   # [n, d] fp32, RoPE of each row's position id
    sin: torch.Tensor
    mask: Optional[object]              # LapMask (lap_attention.py) or [b, 1, m, M] bool; None: plain causal
    padded_rows: int                    # rows seen by the linears: n, rounded up to TP under SP and to
                                        # gemm.bucket_rows for compacted laps with oneDNN GEMMs


def attention_mask(q_order: torch.Tensor, q_valid: torch.Tensor,
                   key_orders: Sequence[torch.Tensor], key_valids: Sequence[torch.Tensor]):
    """Boolean ``[b, 1, m_q, M]`` mask over the concatenated key blocks: key slot visible iff it
    is executed and its token index is <= the query's.

    Query slots that are padding or not executed see every key, so no row is fully masked (their
    outputs are never read). When the only keys are the queries' own and every token executes,
    pass ``mask=None`` to the attention instead (plain causal).
    """
    return LapMask.from_blocks(q_order, q_valid, key_orders, key_valids).dense()


def split_grouped_qkv(qkv: torch.Tensor, groups: int, heads_per_group: int, head_dim: int):
    """Fused rows ``[n, groups·(hpg+2)·d]`` in the grouped layout ``[q..q k v]`` per group ->
    q ``[n, groups·hpg, d]``, k and v ``[n, groups, d]``."""
    n = qkv.shape[0]
    # split (not slicing) so the backward is one concatenation, not three zero-filled copies.
    q, k, v = torch.split(qkv.view(n, groups, heads_per_group + 2, head_dim), [heads_per_group, 1, 1], dim=2)
    return q.reshape(n, groups * heads_per_group, head_dim), k.squeeze(2), v.squeeze(2)


class SelfAttention(nn.Module):
    """Column-parallel fused QKV, 2-D-masked attention over past + current keys through the spec's
    ``core_attention`` (``--attention-backend``, chosen when the model was built), row-parallel output."""

    def __init__(self, cfg, spec, *, init_method, output_init_method, sequence_parallel: bool = False):
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.head_dim = cfg.head_dim
        self.groups = cfg.query_groups // tp
        self.heads_per_group = cfg.num_attention_heads // cfg.query_groups
        self.heads = self.groups * self.heads_per_group
        self.dropout = cfg.attention_dropout
        self.core_attention: AttentionCore = spec.core_attention
        dtype = getattr(torch, cfg.params_dtype)
        qkv_size = (cfg.num_attention_heads + 2 * cfg.query_groups) * cfg.head_dim
        self.linear_qkv = ColumnParallelLinear(
            cfg.hidden_size, qkv_size, bias=False, gather_output=False, init_method=init_method,
            sequence_parallel=sequence_parallel, params_dtype=dtype, gemm_backend=spec.gemm)
        self.linear_proj = RowParallelLinear(
            cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False,
            input_is_parallel=True, init_method=output_init_method,
            sequence_parallel=sequence_parallel, params_dtype=dtype, gemm_backend=spec.gemm)

    def forward(self, x: torch.Tensor, ctx: LapContext, past_keys: Sequence[torch.Tensor] = (),
                past_values: Sequence[torch.Tensor] = ()):
        """``x`` rows ``[n or n_pad/tp, h]`` -> (output rows, this lap's k, v ``[b, g, m, d]``)."""
        comp = ctx.comp
        qkv = self.linear_qkv(x)[: comp.n]
        q, k, v = split_grouped_qkv(qkv, self.groups, self.heads_per_group, self.head_dim)
        q = apply_rotary(q, ctx.cos, ctx.sin)
        k = apply_rotary(k, ctx.cos, ctx.sin)
        q, k, v = (comp.to_padded(t).transpose(1, 2) for t in (q, k, v))
        keys = torch.cat([*past_keys, k], dim=2) if past_keys else k
        values = torch.cat([*past_values, v], dim=2) if past_values else v
        out = self.core_attention(q, keys, values, ctx.mask, self.dropout if self.training else 0.0)
        out = comp.from_padded(out.transpose(1, 2)).reshape(comp.n, self.heads * self.head_dim)
        if ctx.padded_rows > comp.n:
            out = F.pad(out, (0, 0, 0, ctx.padded_rows - comp.n))
        return self.linear_proj(out), k, v
