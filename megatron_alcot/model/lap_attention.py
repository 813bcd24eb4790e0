"""The lap mask as a layout, and an attention core that uses its block structure (FlexAttention).

A lap's queries are its executed (token, step) slots; its keys are the slots of every earlier lap
plus its own, step-major (``[step 0 | step 1 | ... | step k]``). Query slot i sees key slot j iff
``k_order[j] <= q_order[i]`` and ``k_valid[j]`` (docs/method.md §3; ``order`` is the token index of
a slot, ``valid`` says it was executed). Query slots that are padding see every key, so no row is
fully masked (their outputs are never read)::

    lap_mask = LapMask.from_blocks(q_order, q_valid, [o_0, ..., o_k], [v_0, ..., v_k])
    lap_mask.dense()                 # [b, 1, m, M] bool for SDPA / the unfused core (cached)
    lap_mask.block_mask()            # FlexAttention BlockMask, 128 x 128 blocks (cached)
    out = flex_lap_attention(q, keys, values, lap_mask)    # [b, heads, m, d]

Within a block of keys of one step, slots ascend in token order, so for a query tile only a
prefix of each step's key tiles is visible and tiles of keys entirely after the query tile are
skipped, and the kernel reads no ``[b, 1, m, M]`` tensor.

Why FlexAttention rather than one causal call per step merged by log-sum-exp: a past step's
keys are compacted by a different active set than the queries, so what a query sees of them is
a per-query prefix, not a causal triangle; a plain causal kernel cannot express it, and a masked
call per step would reintroduce the dense mask. FlexAttention takes the rule as ``mask_mod``.

CPU: this torch's FlexAttention has no CPU backward, and its CPU forward outside ``torch.compile``
is a reference implementation; :func:`flex_usable` says when the flex path applies, and
``core_attention`` otherwise uses SDPA with the dense mask (same function). docs/bench_lap_attention.md
has the CPU measurements behind ``auto``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

FLEX_BLOCK = 128


@dataclass
class LapMask:
    """The rule above over one lap's query slots and the concatenated key slots of its laps."""

    q_order: torch.Tensor               # [b, m] int64
    q_valid: torch.Tensor               # [b, m] bool
    k_order: torch.Tensor               # [b, M] int64
    k_valid: torch.Tensor               # [b, M] bool
    _dense: Optional[torch.Tensor] = field(default=None, repr=False)
    _block: Optional[object] = field(default=None, repr=False)

    @staticmethod
    def from_blocks(q_order: torch.Tensor, q_valid: torch.Tensor, key_orders: Sequence[torch.Tensor],
                    key_valids: Sequence[torch.Tensor]) -> "LapMask":
        return LapMask(q_order, q_valid, torch.cat(list(key_orders), dim=1),
                       torch.cat(list(key_valids), dim=1))

    @property
    def shape(self):
        return (self.q_order.shape[0], 1, self.q_order.shape[1], self.k_order.shape[1])

    def dense(self) -> torch.Tensor:
        """Boolean ``[b, 1, m, M]``, True = visible."""
        if self._dense is None:
            visible = (self.k_order[:, None, :] <= self.q_order[:, :, None]) & self.k_valid[:, None, :]
            self._dense = (visible | ~self.q_valid[:, :, None])[:, None]
        return self._dense

    def mask_mod(self):
        q_order, q_valid, k_order, k_valid = self.q_order, self.q_valid, self.k_order, self.k_valid

        def visible(b, h, q, kv):
            return ((k_order[b, kv] <= q_order[b, q]) & k_valid[b, kv]) | ~q_valid[b, q]

        return visible

    def block_mask(self):
        if self._block is None:
            b, _, m, keys = self.shape
            self._block = create_block_mask(self.mask_mod(), b, None, m, keys,
                                            device=self.q_order.device, BLOCK_SIZE=FLEX_BLOCK)
        return self._block


def flex_usable(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, dropout_p: float) -> bool:
    """FlexAttention applies: no dropout (it has none), and on CPU no gradient (no CPU backward)."""
    if dropout_p > 0:
        return False
    if q.device.type == "cpu":
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, keys, values)))
    return True


_COMPILED = {}


def _kernel(device_type: str):
    """Compiled FlexAttention on accelerators (its fused kernel); the eager reference on CPU."""
    if device_type == "cpu":
        return flex_attention
    if device_type not in _COMPILED:
        # Default dynamism: the compacted row count changes from lap to lap, so after the first
        # change the kernel is recompiled once with that dimension dynamic, not once per count.
        _COMPILED[device_type] = torch.compile(flex_attention)
    return _COMPILED[device_type]


def flex_lap_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       lap_mask: LapMask) -> torch.Tensor:
    """``softmax(q·kᵀ/√d + mask)·v`` ``[b, heads, m, d]`` over the lap mask's visible keys
    (GQA: heads a multiple of the key groups)."""
    return _kernel(q.device.type)(q, keys, values, block_mask=lap_mask.block_mask(),
                                  enable_gqa=q.shape[1] != keys.shape[1])


__all__ = ["FLEX_BLOCK", "LapMask", "flex_lap_attention", "flex_usable"]
