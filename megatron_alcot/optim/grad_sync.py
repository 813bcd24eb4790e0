"""The one interface through which the training step drives the data-parallel gradient reduction.

    model = DistributedDataParallel(stage, dp_group)   # or optimizer.wrap_model(stage) (ZeRO),
                                                       # or DeepSpeedModel(engine)
    model.zero_grad_buffer()                           # before the first micro-batch of an iteration
    for i, batch in enumerate(micro_batches):
        with model.no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext():
            model(**batch).loss.backward()             # gradients accumulate locally
    model.finish_grad_sync()                           # every gradient reduced over DP
    optimizer.step()

:class:`GradSyncModel` is what the trainer, the schedules and evaluation rely on; ``module`` is the
model (or pipeline stage) being trained, for code that needs the model itself (its config, the
tied embedding, evaluation). Three classes implement it: ``training.ddp.DistributedDataParallel``
(all-reduce), ``optim.distributed_optimizer.ShardedGradModel`` (ZeRO's reduce-scatter, the
optimizer's buffer) and ``optim.deepspeed_glue.DeepSpeedModel`` (DeepSpeed reduces and clears at
its own accumulation boundary). The first two share :class:`GradBufferModel`: one
``optim.grad_buffer.GradBuffer`` (``grads``) whose ``sync`` flag ``no_sync`` turns off.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, Optional, Protocol, runtime_checkable

import torch

from megatron_alcot.optim.grad_buffer import GradBuffer


@runtime_checkable
class GradSyncModel(Protocol):
    """A model whose gradients are reduced over data parallelism (see the module docstring)."""

    module: torch.nn.Module

    def __call__(self, *args, **kwargs): ...

    def zero_grad_buffer(self) -> None:
        """Start an iteration's accumulation: the gradients the optimizer reads are zero."""

    def no_sync(self) -> ContextManager[None]:
        """Backward calls inside accumulate locally; the reduction waits for the last micro-batch."""

    def finish_grad_sync(self) -> None:
        """After the last backward: every gradient the optimizer reads is reduced over DP."""


class GradBufferModel(torch.nn.Module):
    """Base of the wrappers over a :class:`GradBuffer` (``grads``; None when there is nothing to
    reduce). Subclasses say what zeroing and finishing mean for their optimizer."""

    def __init__(self, module: torch.nn.Module, grads: Optional[GradBuffer]):
        super().__init__()
        self.module = module
        self.grads = grads

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (micro-batches before the last)."""
        if self.grads is None:
            yield
            return
        old, self.grads.sync = self.grads.sync, False
        try:
            yield
        finally:
            self.grads.sync = old

    def zero_grad_buffer(self) -> None:
        raise NotImplementedError

    def finish_grad_sync(self) -> None:
        raise NotImplementedError

    # Gradients live in the buffer; a module-style zero_grad means the same as zero_grad_buffer.
    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: ARG002
        self.zero_grad_buffer()
