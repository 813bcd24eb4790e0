"""Inference KV cache keyed by (layer, lap), and incremental decoding on top of it (docs/method.md §8).

    cache = LatentKVCache()
    out = decode(model, cache, prompt_ids)            # prefill: the parallel forward, K/V harvested
    out = decode(model, cache, next_ids)              # [b, 1] new token(s) at the next positions
    out.logits[:, -1], out.num_steps[:, -1]           # readout and ℓ_t of the new token
    keys, values, positions, valid = cache[layer, k]
    cache.num_entries()                               # executed (t, k) entries per layer: Σ_t (1+ℓ_t)

The cache holds, per lap k, one growing block of keys/values ``[b, groups, n_k, head_dim]`` for
each local layer, with the token position and validity of every slot; a slot is added only for an
executed (t, k), so with batch size 1 it holds exactly the executed entries (with a batch, rows
that ran fewer steps leave invalid padding slots, which are never attended to).

``decode`` runs the method's own lap hooks (``first_lap``/``begin``/``end_lap``/``finish``) and
``model.run_lap`` over the new tokens, giving each lap the cached blocks as extra past keys: for
ALCoT, lap k sees the cached blocks of laps ≤ k (every cached entry belongs to an earlier token,
so ``t' ≤ t`` holds) plus the new tokens' own laps < k, which is the 2-D mask of training; methods
with ``reuse_kv = False`` (loop, ponder) see the cached block of their own lap only. Pause caches
its interleaved slots as lap 0. Halting, router and readout are the training code, so token-by-
token decoding equals the parallel forward (``tests/model/test_decoding.py``). The new tokens'
entries are appended after their last lap.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from megatron_alcot.model.attention import LapKV
from megatron_alcot.model.output import ModelOutput


@dataclass
class LapBlock:
    """The cached entries of one lap: per local layer keys/values, plus slot positions/validity."""

    keys: List[torch.Tensor] = field(default_factory=list)     # per layer [b, g, capacity, d]
    values: List[torch.Tensor] = field(default_factory=list)
    positions: Optional[torch.Tensor] = None                    # [b, capacity] int64
    valid: Optional[torch.Tensor] = None                        # [b, capacity] bool
    length: int = 0

    def append(self, kv: LapKV, positions: torch.Tensor) -> None:
        n = positions.shape[1]
        if self.positions is None:
            self.keys = [k.new_empty(k.shape[:2] + (n,) + k.shape[3:]) for k in kv.keys]
            self.values = [v.new_empty(v.shape[:2] + (n,) + v.shape[3:]) for v in kv.values]
            self.positions = positions.new_empty(positions.shape)
            self.valid = kv.valid.new_empty(kv.valid.shape)
        capacity = self.positions.shape[1]
        if self.length + n > capacity:   # amortised growth: doubling
            grow = max(self.length + n, 2 * capacity) - capacity
            self.keys = [_grow(t, grow, 2) for t in self.keys]
            self.values = [_grow(t, grow, 2) for t in self.values]
            self.positions = _grow(self.positions, grow, 1)
            self.valid = _grow(self.valid, grow, 1)
        end = self.length + n
        for dst, src in zip(self.keys + self.values, list(kv.keys) + list(kv.values)):
            dst[:, :, self.length:end] = src
        self.positions[:, self.length:end] = positions
        self.valid[:, self.length:end] = kv.valid
        self.length = end

    def as_past(self) -> LapKV:
        """The block as one earlier lap's LapKV: every slot precedes the new tokens (order -1)."""
        n = self.length
        order = torch.full_like(self.positions[:, :n], -1)
        return LapKV(order, self.valid[:, :n], [k[:, :, :n] for k in self.keys],
                      [v[:, :, :n] for v in self.values])


def _grow(t: torch.Tensor, extra: int, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


class LatentKVCache:
    """Per-lap blocks of executed entries; ``num_tokens`` is the next token's position."""

    def __init__(self):
        self.blocks: Dict[int, LapBlock] = {}
        self.num_tokens = 0

    def __getitem__(self, key):
        """``cache[layer, k]`` -> (keys, values ``[b, g, n, d]``, positions, valid ``[b, n]``)."""
        layer, k = key
        block = self.blocks[k]
        n = block.length
        return (block.keys[layer][:, :, :n], block.values[layer][:, :, :n],
                block.positions[:, :n], block.valid[:, :n])

    def past(self, k: int, reuse_kv: bool) -> List[LapKV]:
        """Cached blocks lap ``k`` may see: laps ≤ k (2-D mask) or lap k only."""
        laps = range(k + 1) if reuse_kv else (k,)
        return [self.blocks[j].as_past() for j in laps if j in self.blocks]

    def append(self, k: int, kv: LapKV, lap_positions: torch.Tensor) -> None:
        """Store a lap's LapKV; ``lap_positions [b, s]`` are the position ids of the lap's tokens."""
        if not kv.keys or kv.keys[0].shape[2] == 0:
            return
        index = kv.order.clamp_max(lap_positions.shape[1] - 1)   # padding slots: order == s
        self.blocks.setdefault(k, LapBlock()).append(kv, lap_positions.gather(1, index))

    def num_entries(self, k: Optional[int] = None) -> int:
        """Executed entries per layer (over the batch), for lap ``k`` or all of them."""
        blocks = self.blocks.values() if k is None else [self.blocks.get(k, LapBlock())]
        return sum(int(b.valid[:, :b.length].sum()) for b in blocks if b.length)

    def allocated_entries(self) -> int:
        """Slots stored per layer including batch padding (excluding spare capacity)."""
        return sum(b.valid.shape[0] * b.length for b in self.blocks.values() if b.length)


@torch.no_grad()
def decode(model, cache: LatentKVCache, tokens: torch.Tensor, halting="learned") -> ModelOutput:
    """Run ``tokens [b, n]`` at positions ``cache.num_tokens ..`` against the cache and append
    their executed entries. Returns the method's ModelOutput for the new tokens (``logits``
    vocab-parallel ``[b, n, V_padded/tp]``, ``num_steps [b, n]``).

    The lap order is the training forward's; only the past keys differ (cached blocks added).
    """
    if not (model.pre_process and model.post_process):
        raise NotImplementedError("decode needs the whole model on one stage (PP = 1)")
    method = model.latent
    b, n = tokens.shape
    start = cache.num_tokens
    positions = torch.arange(start, start + n, device=tokens.device).expand(b, n)
    lap = method.first_lap(model, tokens, positions)
    ctx = method.begin(model, lap, halting=halting, return_logits=True)
    laps = []
    while lap is not None:
        own = [kv for _, kv, _ in laps] if method.reuse_kv else []
        hidden, kv = model.run_lap(lap, cache.past(lap.k, method.reuse_kv) + own)
        laps.append((lap.k, kv, lap.position_ids))
        lap = method.end_lap(model, ctx, lap, hidden)
    out = method.finish(model, ctx)
    for k, kv, lap_positions in laps:
        cache.append(k, kv, lap_positions)
    cache.num_tokens = start + n
    return out
