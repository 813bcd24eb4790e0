"""The flat, bucketed gradient layout shared by DDP and the distributed (ZeRO) optimizer.

    layout = BufferLayout(params_in_backward_order, dp_size=2, bucket_numel=2**22, deferred=tied)
    layout.offset(p), layout.buckets[i].start / .end / .params
    layout.bucket_shard(bucket, dp_rank) -> (lo, hi)       # this rank's 1/DP of the bucket
    layout.owned_slices(dp_rank) -> [OwnedSlice(param_index, lo, hi, shard_lo, param_lo)]

Parameters are placed in the order their gradients become ready (reverse module order), each one
starting at a multiple of ``ALIGN`` (64) elements. A bucket closes once it holds ``bucket_numel``
elements and is padded to a multiple of ``ALIGN * dp_size``, so every rank's 1/DP of every bucket
also starts on a multiple of 64. Why 64: element-wise kernels (the fused / foreach AdamW) run a
vectorised body over the first ``n - n % W`` elements of a tensor and a scalar tail over the rest,
and on some CPUs (AVX2 builds) the two round differently. A sharded optimizer updates slices of
parameters; when a slice starts on a multiple of 64 elements of its parameter, every element falls
in the same lane class and the same body-or-tail part as in the per-parameter update of plain DDP,
so ZeRO and DDP take bitwise the same step on any vector width up to 64.

The tied-embedding copy (``deferred``) gets a bucket of its own at the end: its gradient is summed
over the embedding group before the data-parallel reduction, so that bucket is reduced last.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

ALIGN = 64


def align(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


@dataclass
class Bucket:
    index: int
    params: List[torch.nn.Parameter]
    start: int
    end: int
    deferred: bool = False

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class OwnedSlice:
    param_index: int      # position in BufferLayout.params
    lo: int               # [lo, hi) in the flat buffer
    hi: int
    shard_lo: int         # where it sits in this rank's shard (concatenation of its bucket shards)
    param_lo: int         # first element within the parameter


@dataclass
class BufferLayout:
    params: Sequence[torch.nn.Parameter]
    dp_size: int = 1
    bucket_numel: int = 1 << 22
    deferred: Optional[torch.nn.Parameter] = None
    buckets: List[Bucket] = field(init=False)
    offsets: List[int] = field(init=False)
    numel: int = field(init=False)

    def __post_init__(self) -> None:
        self.params = list(self.params)
        index = {id(p): i for i, p in enumerate(self.params)}
        self.offsets = [0] * len(self.params)
        self.buckets, self._bucket_of = [], {}
        chunk = ALIGN * self.dp_size
        offset, start, current = 0, 0, []

        def close(deferred=False):
            nonlocal offset, start, current
            end = start + align(offset - start, chunk)
            bucket = Bucket(len(self.buckets), current, start, end, deferred)
            for p in current:
                self._bucket_of[id(p)] = bucket.index
            self.buckets.append(bucket)
            offset = start = end
            current = []

        regular = [p for p in self.params if p is not self.deferred]
        for p in regular:
            self.offsets[index[id(p)]] = offset
            offset = align(offset + p.numel())
            current.append(p)
            if offset - start >= self.bucket_numel:
                close()
        if current:
            close()
        if self.deferred is not None and id(self.deferred) in index:
            self.offsets[index[id(self.deferred)]] = offset
            offset = align(offset + self.deferred.numel())
            current = [self.deferred]
            close(deferred=True)
        self.numel = offset
        self._index = index

    def index(self, param: torch.nn.Parameter) -> int:
        return self._index[id(param)]

    def offset(self, param: torch.nn.Parameter) -> int:
        return self.offsets[self._index[id(param)]]

    def bucket_of(self, param: torch.nn.Parameter) -> Bucket:
        return self.buckets[self._bucket_of[id(param)]]

    @property
    def shard_numel(self) -> int:
        return self.numel // self.dp_size

    def bucket_shard(self, bucket: Bucket, dp_rank: int) -> Tuple[int, int]:
        size = bucket.numel // self.dp_size
        return bucket.start + dp_rank * size, bucket.start + (dp_rank + 1) * size

    def owned_slices(self, dp_rank: int) -> List[OwnedSlice]:
        out = []
        for bucket in self.buckets:
            lo, hi = self.bucket_shard(bucket, dp_rank)
            base = bucket.start // self.dp_size
            for p in bucket.params:
                i = self._index[id(p)]
                off = self.offsets[i]
                a, b = max(off, lo), min(off + p.numel(), hi)
                if b > a:
                    out.append(OwnedSlice(i, a, b, base + a - lo, a - off))
        return out

    def describe(self) -> Dict:
        """Plain-data form for checkpoints."""
        return {"align": ALIGN, "dp_size": self.dp_size, "numel": self.numel, "offsets": list(self.offsets),
                "buckets": [[b.start, b.end] for b in self.buckets]}


def full_from_shards(buckets: Sequence[Sequence[int]], shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rebuild the flat buffer from every rank's shard (rank order) of a layout's ``buckets``."""
    dp = len(shards)
    numel = buckets[-1][1] if buckets else 0
    full = torch.zeros(numel, dtype=shards[0].dtype)
    for start, end in buckets:
        size, base = (end - start) // dp, start // dp
        for r, shard in enumerate(shards):
            full[start + r * size:start + (r + 1) * size] = shard[base:base + size]
    return full


def _reduce_scatter(output: torch.Tensor, input: torch.Tensor, group, async_op: bool):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor   # torch renamed it
    return fn(output, input, group=group, async_op=async_op)


class GradBuffer:
    """Gradient storage over a :class:`BufferLayout` and its bucketed data-parallel reduction.

        buf = GradBuffer(layout, op="all_reduce", dp_group=g)             # DDP
        buf = GradBuffer(layout, op="reduce_scatter", dp_group=g)         # ZeRO-1
        buf = GradBuffer(layout, op="reduce_scatter", dp_group=g, streaming=True)   # ZeRO-2
        buf.zero(); ...backward (hooks launch ready buckets)...; buf.finish()
        buf.reduced_view(param_slice) -> the averaged gradient of an owned slice

    Persistent mode keeps one flat fp32 buffer: fp32 parameters' ``.grad`` are views into it (autograd
    accumulates micro-batches in place), other dtypes are added in by a post-accumulate hook. While
    ``sync`` is on, a hook marks each parameter ready; buckets whose parameters are all ready are
    scaled by 1/DP and their asynchronous reduction starts, always in index order so every rank issues
    the same collectives even when some parameter got no gradient on one rank.

    Streaming mode (ZeRO-2) keeps no full buffer: each new ``.grad`` is added into a bucket-sized
    staging tensor (in the communication dtype) and freed; a complete bucket is reduce-scattered and
    the staging tensor freed once its rank's part was added into the 1/DP ``shard``. With
    ``per_round=True`` every backward pass is a round: :meth:`end_round` (called before the next
    forward and by :meth:`finish`) launches the buckets that are left, so gradient accumulation sums
    in the shard and the peak stays 1/DP plus the buckets in flight at any number of micro-batches.
    Without it (PP's lap-cut backward, several backward calls per micro-batch) the staging buckets
    accumulate until :meth:`finish`.

    ``comm_dtype=torch.bfloat16`` (``--grad-reduce-in-bf16``) sends the buckets in bf16.
    """

    def __init__(self, layout: BufferLayout, *, op: str, dp_group=None, dp_rank: int = 0,
                 comm_dtype: torch.dtype = torch.float32, streaming: bool = False,
                 per_round: bool = False, overlap: bool = True):
        if op not in ("all_reduce", "reduce_scatter"):
            raise ValueError(f"op must be all_reduce or reduce_scatter, got {op!r}")
        if streaming and op != "reduce_scatter":
            raise ValueError("streaming gradients need op='reduce_scatter'")
        self.layout, self.op, self.dp_group, self.dp_rank = layout, op, dp_group, dp_rank
        self.dp_size = layout.dp_size
        self.comm_dtype, self.streaming, self.per_round = comm_dtype, streaming, per_round
        self.overlap = overlap
        self.device = layout.params[0].device
        self.sync = True
        self.data: Optional[torch.Tensor] = None        # persistent full buffer
        self.shard: Optional[torch.Tensor] = None       # streaming: reduced 1/DP, fp32
        self._staging: Dict[int, torch.Tensor] = {}
        self._inflight: List[tuple] = []
        self._pending = [set() for _ in layout.buckets]
        self._launched = [False] * len(layout.buckets)
        self._round_open = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in layout.params]
        self.zero()

    # --- storage ---------------------------------------------------------------------------------
    def view(self, param: torch.nn.Parameter) -> torch.Tensor:
        off = self.layout.offset(param)
        return self.data[off:off + param.numel()]

    def zero(self) -> None:
        """Start a new accumulation (before the first micro-batch of a step)."""
        self._wait_all()
        self._staging.clear()
        self._reset_round()
        if self.streaming:
            self.data = None
            if self.shard is None:
                self.shard = torch.zeros(self.layout.shard_numel, dtype=torch.float32, device=self.device)
            else:
                self.shard.zero_()
            for p in self.layout.params:
                p.grad = None
            return
        if self.data is None:
            self.data = torch.zeros(self.layout.numel, dtype=torch.float32, device=self.device)
        else:
            self.data.zero_()
        for p in self.layout.params:
            if p.dtype == torch.float32:
                view = self.view(p)
                if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                    p.grad = None      # replaced by someone (module.zero_grad): start from zero
                p.grad = view.view_as(p)
            else:
                p.grad = None

    def release(self) -> None:
        """Free the full buffer / the shard (ZeRO-2 after the step; next :meth:`zero` re-creates)."""
        self._wait_all()
        self.data = self.shard = None
        for p in self.layout.params:
            p.grad = None

    def _reset_round(self) -> None:
        for i, b in enumerate(self.layout.buckets):
            self._pending[i] = set(id(p) for p in b.params)
            self._launched[i] = False
        self._round_open = False

    # --- hooks and launching ---------------------------------------------------------------------
    def _staging_of(self, bucket: Bucket) -> torch.Tensor:
        buf = self._staging.get(bucket.index)
        if buf is None:
            buf = torch.zeros(bucket.numel, dtype=self.comm_dtype, device=self.device)
            self._staging[bucket.index] = buf
        return buf

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        bucket = self.layout.bucket_of(param)
        if self.streaming and not bucket.deferred:
            off = self.layout.offset(param) - bucket.start
            self._staging_of(bucket)[off:off + param.numel()].add_(param.grad.reshape(-1))
            param.grad = None
        elif not self.streaming:
            self._adopt(param)
        if bucket.deferred:
            return           # summed over the embedding group first; reduced in finish()
        self._round_open = True
        if not (self.sync or self.per_round) or self.dp_size == 1 or not self.overlap:
            return
        if self._launched[bucket.index]:
            raise RuntimeError(f"gradient of a parameter in bucket {bucket.index} arrived after the "
                               "bucket's reduction started; run one backward call per micro-batch "
                               "(non-reentrant activation checkpointing)")
        self._pending[bucket.index].discard(id(param))
        for b in self.layout.buckets:
            if self._launched[b.index] or b.deferred:
                continue
            if self._pending[b.index]:
                break
            self._launch(b)

    def _adopt(self, param: torch.nn.Parameter) -> None:
        # fp32 gradients normally are views of the buffer already; anything else (other dtypes, a
        # .grad someone set to None in between) is added in and the view put back.
        view = self.view(param)
        if param.grad.data_ptr() == view.data_ptr():
            return
        view.add_(param.grad.reshape(-1))
        param.grad = view.view_as(param) if param.dtype == torch.float32 else None

    def end_round(self) -> None:
        """Streaming, one round per backward: launch what is left and fold it into the shard."""
        if not (self.streaming and self.per_round and self._round_open):
            return
        for b in self.layout.buckets:
            if not self._launched[b.index] and not b.deferred:
                self._launch(b)
        self._wait_all()
        self._reset_round()

    def _source(self, bucket: Bucket) -> torch.Tensor:
        if self.streaming:
            if bucket.deferred:
                p = bucket.params[0]
                src = self._staging_of(bucket)
                if p.grad is not None:
                    src[:p.numel()].add_(p.grad.reshape(-1))
                    p.grad = None
                return src
            return self._staging_of(bucket)
        return self.data[bucket.start:bucket.end]

    def _launch(self, bucket: Bucket) -> None:
        self._launched[bucket.index] = True
        src = self._source(bucket)
        payload = src if src.dtype == self.comm_dtype else src.to(self.comm_dtype)
        if self.dp_size > 1:
            payload.div_(self.dp_size)
        lo, hi = self.layout.bucket_shard(bucket, self.dp_rank)
        part = slice(lo - bucket.start, hi - bucket.start)
        handle = None
        if self.dp_size > 1:
            if self.op == "all_reduce":
                handle = dist.all_reduce(payload, group=self.dp_group, async_op=True)
            else:
                handle = _reduce_scatter(payload[part], payload, self.dp_group, async_op=True)
        self._inflight.append((bucket, src, payload, part, handle))
        if self.streaming:
            # At most one bucket in flight besides the one being filled: bounds the staging memory.
            while len(self._inflight) > 1:
                self._complete(self._inflight.pop(0))

    def _complete(self, item) -> None:
        bucket, src, payload, part, handle = item
        if handle is not None:
            handle.wait()
        if self.streaming:
            base = bucket.start // self.dp_size
            self.shard[base:base + (part.stop - part.start)].add_(payload[part])
            self._staging.pop(bucket.index, None)
        elif payload is not src:
            if self.op == "all_reduce":
                src.copy_(payload)
            else:
                src[part].copy_(payload[part])

    def _wait_all(self) -> None:
        items, self._inflight = self._inflight, []
        for item in items:
            self._complete(item)

    def finish(self) -> None:
        """Every bucket reduced (and, streaming, folded into the shard). Collective over DP."""
        if self.streaming and self.per_round:
            self.end_round()
            self._round_open = True        # the deferred bucket is reduced once per step
        for b in self.layout.buckets:
            if not self._launched[b.index] and (b.deferred or not (self.streaming and self.per_round)):
                self._launch(b)
        self._wait_all()
        self._reset_round()

    # --- reading the result ------------------------------------------------------------------
    def reduced(self, s: OwnedSlice) -> torch.Tensor:
        """The averaged gradient of an owned slice (reduce_scatter) after :meth:`finish`."""
        if self.streaming:
            return self.shard[s.shard_lo:s.shard_lo + (s.hi - s.lo)]
        return self.data[s.lo:s.hi]
