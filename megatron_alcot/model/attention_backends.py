"""The attention core ``softmax(q·kᵀ/√d + mask)·v`` behind ``--attention-backend``.

    core = attention_core("auto")                      # once, when the model is built (spec.py)
    out = core(q, keys, values, mask=None, dropout_p=0.0)
    # q [b, heads, m, d]; keys/values [b, groups, M, d] (GQA: heads is a multiple of groups);
    # mask [b, 1, m, M] bool (True = visible), a LapMask, or None for plain causal (m == M)
    out = core_attention(q, keys, values, mask, dropout_p, backend="auto")   # the same, resolved per call

* ``sdpa``: ``F.scaled_dot_product_attention``; torch picks its fused kernel (flash or
  memory-efficient on GPUs, the flash kernel on CPUs).
* ``unfused``: two matmuls and an fp32 softmax, the scores materialised as ``[b, heads, m, M]``.
  In bf16/fp16 on CPUs this is 2-3x faster than torch's CPU flash kernel, whose backward is slow
  for short keys (see docs/bench_train_throughput.md); it costs ``O(m·M)`` memory.
* ``auto``: on CPUs with at most ``UNFUSED_MAX_KEYS`` keys, ``unfused`` where
  :mod:`megatron_alcot.hardware` measured it at least 1.15x SDPA's speed in this precision
  (forward + backward; typically bf16/fp16); ``flex`` for lap masks on CUDA (``FLEX_ON``
  device types); ``sdpa`` everywhere else. :class:`AutoCore` reads the machine's answers once,
  when it is built; device, precision, key count and mask kind are the call's.
* ``flex``: FlexAttention over the lap mask's blocks (``lap_attention.py``) when ``mask`` is a
  :class:`LapMask`; plain causal calls, dropout, and CPU calls that need a gradient (this torch
  has no CPU flex backward) use ``sdpa``. On CPUs it is never faster (docs/bench_lap_attention.md),
  so ``auto`` does not pick it there.

``mask`` may be a dense boolean tensor or a :class:`LapMask` (made dense only when a core needs it).

Both compute the same function (fp32 outputs agree to rounding); the mask rule is the caller's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from megatron_alcot import hardware
from megatron_alcot.config import ATTENTION_BACKENDS
from megatron_alcot.model.lap_attention import LapMask, flex_lap_attention, flex_usable

UNFUSED_MAX_KEYS = 256       # CPU bf16: unfused ahead up to 256 keys, behind from 384
FLEX_ON = ("cuda",)          # device types where auto sends lap masks to FlexAttention

Mask = Union[torch.Tensor, LapMask, None]


def _sdpa(q, keys, values, mask, dropout_p):
    if isinstance(mask, LapMask):
        mask = mask.dense()
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None,
                                          dropout_p=dropout_p, enable_gqa=q.shape[1] > keys.shape[1])


def _unfused(q, keys, values, mask, dropout_p):
    if isinstance(mask, LapMask):
        mask = mask.dense()
    rep = q.shape[1] // keys.shape[1]
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


class AttentionCore:
    """``core(q, keys, values, mask=None, dropout_p=0.0)`` -> ``[b, heads, m, d]``; ``name`` is
    its ``--attention-backend`` value. :meth:`pick` is the core that runs a call of these queries."""

    name = ""

    def pick(self, q: torch.Tensor, num_keys: int, lap_mask: bool) -> "AttentionCore":
        return self

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Mask = None,
                 dropout_p: float = 0.0) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SDPACore(AttentionCore):
    name = "sdpa"

    def __call__(self, q, keys, values, mask=None, dropout_p=0.0):
        return _sdpa(q, keys, values, mask, dropout_p)


class UnfusedCore(AttentionCore):
    name = "unfused"

    def __call__(self, q, keys, values, mask=None, dropout_p=0.0):
        return _unfused(q, keys, values, mask, dropout_p)


class FlexCore(AttentionCore):
    """FlexAttention for lap masks where :func:`flex_usable`; SDPA for every other call."""

    name = "flex"

    def __call__(self, q, keys, values, mask=None, dropout_p=0.0):
        if isinstance(mask, LapMask) and flex_usable(q, keys, values, dropout_p):
            return flex_lap_attention(q, keys, values, mask)
        return _sdpa(q, keys, values, mask, dropout_p)


SDPA, UNFUSED, FLEX = SDPACore(), UnfusedCore(), FlexCore()
FIXED = {core.name: core for core in (SDPA, UNFUSED, FLEX)}


@dataclass(frozen=True)
class AutoCore(AttentionCore):
    """``auto``'s rule (module doc) with the machine's measured answers taken when it was built:
    ``unfused_fp32`` / ``unfused_low`` say whether the unfused core beat SDPA on this CPU in fp32 /
    in bf16 and fp16. Plain attributes, so a compiled forward reads them without a graph break."""

    unfused_fp32: bool
    unfused_low: bool
    name = "auto"

    @staticmethod
    def from_machine() -> "AutoCore":
        m = hardware.machine()
        return AutoCore(unfused_fp32=m.unfused_faster(False), unfused_low=m.unfused_faster(True))

    def pick(self, q, num_keys, lap_mask):
        if lap_mask and q.device.type in FLEX_ON:
            return FLEX
        if q.device.type != "cpu" or num_keys > UNFUSED_MAX_KEYS:
            return SDPA
        low_precision = q.dtype in (torch.bfloat16, torch.float16)
        return UNFUSED if (self.unfused_low if low_precision else self.unfused_fp32) else SDPA

    def __call__(self, q, keys, values, mask=None, dropout_p=0.0):
        return self.pick(q, keys.shape[2], isinstance(mask, LapMask))(q, keys, values, mask, dropout_p)


def attention_core(backend: str) -> AttentionCore:
    """The core for ``--attention-backend backend``; ``auto`` reads the machine's answers now."""
    if backend == "auto":
        return AutoCore.from_machine()
    if backend not in FIXED:
        raise ValueError(f"--attention-backend {backend!r} is unknown; choose one of {', '.join(ATTENTION_BACKENDS)}")
    return FIXED[backend]


def resolve_backend(backend: str, q: torch.Tensor, num_keys: int, lap_mask: bool = False) -> str:
    """The backend ``auto`` stands for with these queries, this many keys, and (``lap_mask``) a
    :class:`LapMask` rather than a dense mask or plain causal."""
    if backend != "auto":
        return backend
    return AutoCore.from_machine().pick(q, num_keys, lap_mask).name


def core_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Mask = None,
                   dropout_p: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Attention output ``[b, heads, m, d]`` through ``backend`` resolved for this call (tools,
    benches and the probe; the model resolves its core once, see ``spec.py``)."""
    return attention_core(backend)(q, keys, values, mask, dropout_p)


__all__ = ["ATTENTION_BACKENDS", "FLEX_ON", "UNFUSED_MAX_KEYS", "AttentionCore", "AutoCore", "FlexCore",
           "LapMask", "SDPACore", "UnfusedCore", "attention_core", "core_attention", "resolve_backend"]
