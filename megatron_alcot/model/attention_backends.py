"""The attention core ``softmax(q·kᵀ/√d + mask)·v`` behind ``--attention-backend``.

    out = core_attention(q, keys, values, mask=None, dropout_p=0.0, backend="auto")
    # q [b, heads, m, d]; keys/values [b, groups, M, d] (GQA: heads is a multiple of groups);
    # mask [b, 1, m, M] bool (True = visible) or None for plain causal (m == M)

* ``sdpa``: ``F.scaled_dot_product_attention``; torch picks its fused kernel (flash or
  memory-efficient on GPUs, the flash kernel on CPUs).
* ``unfused``: two matmuls and an fp32 softmax, the scores materialised as ``[b, heads, m, M]``.
  In bf16/fp16 on CPUs this is 2-3x faster than torch's CPU flash kernel, whose backward is slow
  for short keys (see docs/bench_train_throughput.md); it costs ``O(m·M)`` memory.
* ``auto``: on CPUs with at most ``UNFUSED_MAX_KEYS`` keys, ``unfused`` where
  :mod:`megatron_alcot.hardware` measured it at least 1.15x SDPA's speed in this precision
  (forward + backward; typically bf16/fp16); ``flex`` for lap masks on CUDA (``FLEX_ON``
  device types); ``sdpa`` everywhere else.
* ``flex``: FlexAttention over the lap mask's blocks (``lap_attention.py``) when ``mask`` is a
  :class:`LapMask`; plain causal calls, dropout, and CPU calls that need a gradient (this torch
  has no CPU flex backward) use ``sdpa``. On CPUs it is never faster (docs/bench_lap_attention.md),
  so ``auto`` does not pick it there.

``mask`` may be a dense boolean tensor or a :class:`LapMask` (made dense only when a backend needs it).

Both compute the same function (fp32 outputs agree to rounding); the mask rule is the caller's.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from megatron_alcot import hardware
from megatron_alcot.config import ATTENTION_BACKENDS
from megatron_alcot.model.lap_attention import LapMask, flex_lap_attention, flex_usable

UNFUSED_MAX_KEYS = 256       # CPU bf16: unfused ahead up to 256 keys, behind from 384
FLEX_ON = ("cuda",)          # device types where auto sends lap masks to FlexAttention


def resolve_backend(backend: str, q: torch.Tensor, num_keys: int, lap_mask: bool = False) -> str:
    """The backend ``auto`` stands for with these queries, this many keys, and (``lap_mask``) a
    :class:`LapMask` rather than a dense mask or plain causal."""
    if backend != "auto":
        return backend
    if lap_mask and q.device.type in FLEX_ON:
        return "flex"
    if q.device.type != "cpu" or num_keys > UNFUSED_MAX_KEYS:
        return "sdpa"
    low_precision = q.dtype in (torch.bfloat16, torch.float16)
    return "unfused" if hardware.machine().unfused_faster(low_precision) else "sdpa"


def core_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   mask: Union[torch.Tensor, LapMask, None] = None, dropout_p: float = 0.0,
                   backend: str = "auto") -> torch.Tensor:
    """Attention output ``[b, heads, m, d]``; see the module doc for shapes and backends."""
    rep = q.shape[1] // keys.shape[1]
    chosen = resolve_backend(backend, q, keys.shape[2], isinstance(mask, LapMask))
    if isinstance(mask, LapMask):
        if chosen == "flex" and flex_usable(q, keys, values, dropout_p):
            return flex_lap_attention(q, keys, values, mask)
        mask = mask.dense()
    if chosen in ("sdpa", "flex"):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None,
                                              dropout_p=dropout_p, enable_gqa=rep > 1)
    if rep > 1:
        keys = keys.repeat_interleave(rep, dim=1)
        values = values.repeat_interleave(rep, dim=1)
    scores = (q * q.shape[-1] ** -0.5) @ keys.transpose(-1, -2)
    if mask is None:
        m = q.shape[2]
        mask = torch.ones(m, m, dtype=torch.bool, device=q.device).tril_()
    scores = torch.where(mask, scores, float("-inf"))   # no inverted copy of the shared lap mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ values


__all__ = ["ATTENTION_BACKENDS", "FLEX_ON", "UNFUSED_MAX_KEYS", "LapMask", "core_attention", "resolve_backend"]
