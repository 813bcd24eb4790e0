"""Data-parallel gradient averaging with flat fp32 buckets, overlapped with the backward pass.

    ddp = DistributedDataParallel(model, dp_group=parallel_state.get_data_parallel_group(), bucket_size_mb=25)
    for i, batch in enumerate(micro_batches):
        with ddp.no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext():
            ddp(**batch).loss.backward()
    ddp.finish_grad_sync()      # every bucket all-reduced and averaged over DP
    ...optimizer.step()...
    ddp.zero_grad_buffer()

Every parameter's ``.grad`` is a view into one flat fp32 buffer, so autograd accumulates
micro-batches in place and a bucket is one contiguous all-reduce. The buffer is the one the
distributed optimizer uses (``optim.grad_buffer``): reverse parameter order (roughly the order
gradients become ready), every parameter on a 64-element boundary. During the last micro-batch's
backward a post-accumulate hook marks each parameter ready; a bucket whose parameters are all ready
is scaled by 1/DP and its asynchronous all-reduce starts while backward continues. Buckets are
always launched in index order, so every rank issues the same sequence of collectives even when
the latent steps leave some parameters (e.g. a deep router) without a gradient on one rank.
With a single data-parallel replica the wrapper steps aside: plain autograd gradients, set to
``None`` between steps. Parameters marked ``sequence_parallel`` (norm weights under sequence
parallelism) additionally get their gradient summed over the TP group. The trainer drives it
through the interface of ``optim.grad_sync``, which ZeRO's and DeepSpeed's wrappers share.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_alcot.optim.grad_buffer import BufferLayout, GradBuffer
from megatron_alcot.optim.grad_sync import GradBufferModel
from megatron_alcot.optim.tied_embedding import tied_embedding_weight
from megatron_alcot.parallel import parallel_state


class DistributedDataParallel(GradBufferModel):
    def __init__(self, module: torch.nn.Module, dp_group=None, *, bucket_size_mb: float = 25.0,
                 overlap_grad_reduce: bool = True, dp_size: Optional[int] = None,
                 grad_reduce_in_bf16: bool = False):
        super().__init__(module, None)
        self.dp_group = dp_group
        self.dp_size = dp_size if dp_size is not None else parallel_state.get_data_parallel_world_size()
        self.overlap = overlap_grad_reduce and self.dp_size > 1
        params = [p for p in module.parameters() if p.requires_grad]
        self._trainable = tuple(params)     # walking the module tree every step costs ~1 ms on CPU
        # One replica: nothing to reduce, so plain autograd gradients (no buffer to fill and add into).
        self.passthrough = self.dp_size == 1 and not any(getattr(p, "sequence_parallel", False)
                                                          for p in params)
        if not self.passthrough:
            for p in params:
                if p.dtype != torch.float32:
                    raise TypeError("DistributedDataParallel keeps fp32 gradients; parameters must be fp32 "
                                    f"(got {p.dtype}); mixed precision runs the model under autocast")
            # The tied-embedding copy is summed over the embedding group first (train_step), so its
            # bucket waits for finish_grad_sync.
            layout = BufferLayout(list(reversed(params)), dp_size=self.dp_size,
                                  bucket_numel=max(1, int(bucket_size_mb * 1024 * 1024 / 4)),
                                  deferred=tied_embedding_weight(module))
            dp_rank = dist.get_rank(dp_group) if self.dp_size > 1 else 0
            self.grads = GradBuffer(layout, op="all_reduce", dp_group=dp_group, dp_rank=dp_rank,
                                    comm_dtype=torch.bfloat16 if grad_reduce_in_bf16 else torch.float32,
                                    overlap=self.overlap)
            self.grads.sync = True
        self._sp_params = [p for p in params if getattr(p, "sequence_parallel", False)]

    @property
    def grad_buffer(self) -> Optional[torch.Tensor]:
        return self.grads.data if self.grads is not None else None

    # --- reduction ---------------------------------------------------------------------------------
    def finish_grad_sync(self) -> None:
        """Make sure every bucket is reduced and averaged; call after the last backward."""
        if self.passthrough:
            # Same update as with the buffer: a parameter without gradient gets a zero one.
            for p in self._trainable:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            return
        self.grads.finish()
        if self._sp_params and parallel_state.get_tensor_model_parallel_world_size() > 1:
            grads = [p.grad for p in self._sp_params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def zero_grad_buffer(self) -> None:
        if self.passthrough:
            for p in self._trainable:
                p.grad = None
            return
        self.grads.zero()
