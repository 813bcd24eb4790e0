"""Which (batch row, token) pairs a lap computes, and how they are laid out.

A lap runs its matmuls on the *active rows* only, ``[n, h]`` (gathered with ``index_select``),
and its attention on a per-batch-row padded layout ``[b, m, ...]`` with ``m`` = the largest
active count of any batch row, so neither needs a Python loop over tokens or batch rows::

    comp = Compaction.build(active)          # active: bool [b, s]; one host sync (the sizes)
    comp = Compaction.build(active, sizes=(n, m))   # sizes known on the host already: no sync
    rows = comp.gather(hidden)               # [b, s, h] -> [n, h]
    q = comp.to_padded(q_rows)               # [n, ...] -> [b, m, ...] (padding slots are zero)
    o = comp.from_padded(o)                  # [b, m, ...] -> [n, ...]
    hidden = comp.scatter(hidden, rows)      # rows written back; inactive tokens keep ``hidden``

``Compaction.build(active, compact=False)`` is the compute-all-and-mask variant (every token is a
row; only the active ones count as executed): same results, no savings. It exists to test that
compaction changes nothing.

``order`` [b, m] is each slot's token index (the causal order of the 2-D mask; padding slots get
``s``), ``valid`` [b, m] marks slots that hold an executed (t, k).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass
class Compaction:
    batch: int
    seq: int
    n: int                              # computed rows
    m: int                              # padded slots per batch row
    order: torch.Tensor                 # [b, m] int64 token index of each slot (padding: seq)
    valid: torch.Tensor                 # [b, m] bool, slot holds an executed (t, k)
    rows: Optional[torch.Tensor] = None   # [n] flat b*s index of each row; None: all rows, in order
    slots: Optional[torch.Tensor] = None  # [n] flat b*m slot of each row; None: slot == row
    active: Optional[torch.Tensor] = None  # [b, s] set in the compute-all variant

    @staticmethod
    def build(active: torch.Tensor, compact: bool = True,
              sizes: Optional[Tuple[int, int]] = None) -> "Compaction":
        """``sizes``: (active count, largest count of a batch row), if the caller has them on the
        host; otherwise they are read here in one host sync. No other op here syncs."""
        b, s = active.shape
        device = active.device
        if not compact:
            order = torch.arange(s, device=device).expand(b, s)
            return Compaction(b, s, b * s, s, order, active.clone(), active=active)
        counts = active.sum(dim=1)
        if sizes is None:
            sizes = torch.stack([counts.sum(), counts.max()]).tolist()
        n, m = int(sizes[0]), int(sizes[1])
        if n == b * s:
            order = torch.arange(s, device=device).expand(b, s)
            return Compaction(b, s, b * s, s, order, active.clone())
        rows = active.reshape(-1).nonzero_static(size=n).squeeze(1)
        slot_in_row = (torch.cumsum(active.to(torch.int64), dim=1) - 1).reshape(-1)[rows]
        batch_of_row = torch.div(rows, s, rounding_mode="floor")
        slots = batch_of_row * m + slot_in_row
        order = torch.full((b * m,), s, dtype=torch.int64, device=device)
        order[slots] = rows - batch_of_row * s
        valid = torch.zeros(b * m, dtype=torch.bool, device=device)
        valid[slots] = True
        return Compaction(b, s, n, m, order.view(b, m), valid.view(b, m), rows, slots)

    @property
    def all_executed(self) -> bool:
        """Every token of the sequence executes this step (rows are the plain sequence)."""
        return self.rows is None and self.active is None

    @property
    def dense(self) -> bool:
        """Every token of the sequence is a row and rows are already in padded order."""
        return self.rows is None

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, s, ...]`` -> rows ``[n, ...]``."""
        flat = x.reshape((self.batch * self.seq,) + tuple(x.shape[2:]))
        return flat if self.dense else flat.index_select(0, self.rows)

    def scatter(self, base: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Write rows ``[n, ...]`` into ``base [b, s, ...]`` at the executed tokens (out of place)."""
        shape = base.shape
        if self.dense:
            out = rows.reshape(shape)
            if self.active is not None:
                mask = self.active.reshape(self.active.shape + (1,) * (len(shape) - 2))
                out = torch.where(mask, out, base)
            return out
        flat = base.reshape((self.batch * self.seq,) + tuple(shape[2:]))
        return flat.index_copy(0, self.rows, rows.to(base.dtype)).reshape(shape)

    def to_padded(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``[n, ...]`` -> ``[b, m, ...]``, zeros in padding slots."""
        tail = tuple(rows.shape[1:])
        if self.dense:
            return rows.reshape((self.batch, self.m) + tail)
        out = rows.new_zeros((self.batch * self.m,) + tail)
        return out.index_copy(0, self.slots, rows).reshape((self.batch, self.m) + tail)

    def from_padded(self, padded: torch.Tensor) -> torch.Tensor:
        """``[b, m, ...]`` -> rows ``[n, ...]``."""
        flat = padded.reshape((self.batch * self.m,) + tuple(padded.shape[2:]))
        return flat if self.dense else flat.index_select(0, self.slots)
