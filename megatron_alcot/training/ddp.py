"""Data-parallel gradient averaging with flat fp32 buckets, overlapped with the backward pass.

    ddp = DistributedDataParallel(model, dp_group=state.get_data_parallel_group(), bucket_size_mb=25)
    for i, batch in enumerate(micro_batches):
        with ddp.no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext():
            ddp(**batch).loss.backward()
    ddp.finish_grad_sync()      # every bucket all-reduced and averaged over DP
    ...optimizer.step()...
    ddp.zero_grad_buffer()

Every parameter's ``.grad`` is a view into one flat fp32 buffer, so autograd accumulates
micro-batches in place and a bucket is one contiguous all-reduce. The buffer is laid out in
reverse parameter order (roughly the order gradients become ready). During the last micro-batch's
backward a post-accumulate hook marks each parameter ready; a bucket whose parameters are all ready
is scaled by 1/DP and its asynchronous all-reduce starts while backward continues. Buckets are
always launched in index order, so every rank issues the same sequence of collectives even when
the latent steps leave some parameters (e.g. a deep router) without a gradient on one rank.
With a single data-parallel replica the wrapper steps aside: plain autograd gradients, set to
``None`` between steps. Parameters marked ``sequence_parallel`` (norm weights under sequence parallelism) additionally get
their gradient summed over the TP group.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_alcot.optim.tied_embedding import tied_embedding_weight
from megatron_alcot.parallel import state


class _Bucket:
    def __init__(self, params: List[torch.nn.Parameter], data: torch.Tensor):
        self.params = params
        self.data = data
        self.pending = set(id(p) for p in params)
        self.handle = None
        self.launched = False

    def reset(self) -> None:
        self.pending = set(id(p) for p in self.params)
        self.handle = None
        self.launched = False


class DistributedDataParallel(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, dp_group=None, *, bucket_size_mb: float = 25.0,
                 overlap_grad_reduce: bool = True, dp_size: Optional[int] = None):
        super().__init__()
        self.module = module
        self.dp_group = dp_group
        self.dp_size = dp_size if dp_size is not None else state.get_data_parallel_world_size()
        self.overlap = overlap_grad_reduce and self.dp_size > 1
        self._sync_enabled = True
        params = [p for p in module.parameters() if p.requires_grad]
        self._trainable = tuple(params)     # walking the module tree every step costs ~1 ms on CPU
        params = list(reversed(params))
        # One replica: nothing to reduce, so plain autograd gradients (no buffer to fill and add into).
        self.passthrough = self.dp_size == 1 and not any(getattr(p, "sequence_parallel", False)
                                                          for p in params)
        if self.passthrough:
            params = []
        numel = sum(p.numel() for p in params)
        self.grad_buffer = torch.zeros(numel, dtype=torch.float32,
                                       device=params[0].device if params else "cpu")
        limit = max(1, int(bucket_size_mb * 1024 * 1024 / 4))
        self.buckets: List[_Bucket] = []
        self._bucket_of = {}
        offset, start, current = 0, 0, []
        for p in params:
            if p.dtype != torch.float32:
                raise TypeError("DistributedDataParallel keeps fp32 gradients; parameters must be fp32 "
                                f"(got {p.dtype}); mixed precision runs the model under autocast")
            p.grad = self.grad_buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            current.append(p)
            if offset - start >= limit:
                self._add_bucket(current, start, offset)
                start, current = offset, []
        if current:
            self._add_bucket(current, start, offset)
        # The tied-embedding copy is summed over the embedding group first (train_step), so its
        # bucket waits for finish_grad_sync.
        self._deferred = tied_embedding_weight(module)
        self._hooks = []
        if self.overlap:
            for p in params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))
        self._sp_params = [p for p in params if getattr(p, "sequence_parallel", False)]

    def _add_bucket(self, params, start, end) -> None:
        bucket = _Bucket(params, self.grad_buffer[start:end])
        for p in params:
            self._bucket_of[id(p)] = len(self.buckets)
        self.buckets.append(bucket)

    # --- forward and micro-batch control ---------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (micro-batches before the last)."""
        old, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = old

    # --- reduction ---------------------------------------------------------------------------------
    def _launch(self, bucket: _Bucket, async_op: bool) -> None:
        bucket.data.div_(self.dp_size)
        bucket.handle = dist.all_reduce(bucket.data, group=self.dp_group, async_op=async_op)
        bucket.launched = True

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        if not self._sync_enabled or param is self._deferred:
            return
        index = self._bucket_of[id(param)]
        self.buckets[index].pending.discard(id(param))
        for bucket in self.buckets:      # launch in index order only
            if bucket.launched:
                continue
            if bucket.pending:
                break
            self._launch(bucket, async_op=True)

    def finish_grad_sync(self) -> None:
        """Make sure every bucket is reduced and averaged; call after the last backward."""
        if self.passthrough:
            # Same update as with the buffer: a parameter without gradient gets a zero one.
            for p in self._trainable:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            return
        if self.dp_size > 1:
            for bucket in self.buckets:
                if not bucket.launched:
                    self._launch(bucket, async_op=self.overlap)
            for bucket in self.buckets:
                if bucket.handle is not None and self.overlap:
                    bucket.handle.wait()
                bucket.reset()
        if self._sp_params and state.get_tensor_model_parallel_world_size() > 1:
            grads = [p.grad for p in self._sp_params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=state.get_tensor_model_parallel_group())
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def zero_grad_buffer(self) -> None:
        if self.passthrough:
            for p in self._trainable:
                p.grad = None
            return
        self.grad_buffer.zero_()
        for bucket in self.buckets:
            bucket.reset()

    # Gradients stay views into the buffer; optimizers must not set them to None.
    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: ARG002
        self.zero_grad_buffer()
