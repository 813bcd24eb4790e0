"""Autograd-aware collectives over the tensor-model-parallel (TP) group.

Tensor-parallel region (split along the LAST dim, e.g. attention heads / FFN columns)::

    x = copy_to_tensor_model_parallel_region(x)        # fwd identity,   bwd all-reduce
    y = reduce_from_tensor_model_parallel_region(y)    # fwd all-reduce, bwd identity
    y = scatter_to_tensor_model_parallel_region(y)     # fwd keep my last-dim slice, bwd all-gather
    y = gather_from_tensor_model_parallel_region(y)    # fwd all-gather last dim,    bwd keep slice

Sequence-parallel region (token rows split across TP ranks along ``dim``)::

    x = scatter_to_sequence_parallel_region(x, dim=0)           # fwd keep my rows,  bwd all-gather
    x = gather_from_sequence_parallel_region(x, dim=0)          # fwd all-gather,    bwd reduce-scatter
    y = reduce_scatter_to_sequence_parallel_region(y, dim=0)    # fwd reduce-scatter, bwd all-gather

The sequence dim defaults to 0: token rows of a flattened ``[n, h]`` tensor (the layout of
compacted rows). For batch-first ``[b, s, h]`` hidden states pass ``dim=1`` to split the sequence
(or flatten to ``[b*s, h]`` and keep ``dim=0``). The split dim must be divisible by the TP size.

Every function is the identity (no communication, same tensor object) when the TP size is 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_alcot.parallel import parallel_state
from megatron_alcot.parallel.tensor_parallel.utils import all_gather_dim0, divide, reduce_scatter_dim0


def _tp():
    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_group()


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    world, group = _tp()
    if world == 1:
        return x
    # Reduce a copy: the input may be saved by another autograd node or be a leaf.
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int) -> torch.Tensor:
    world, _ = _tp()
    if world == 1:
        return x
    size = divide(x.shape[dim], world, f"dim {dim} of a tensor of shape {tuple(x.shape)}")
    rank = parallel_state.get_tensor_model_parallel_rank()
    return x.narrow(dim, rank * size, size).contiguous()


def _gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    world, group = _tp()
    if world == 1:
        return x
    out = all_gather_dim0(x.movedim(dim, 0), group, world)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int) -> torch.Tensor:
    world, group = _tp()
    if world == 1:
        return x
    out = reduce_scatter_dim0(x.movedim(dim, 0), group, world)
    return out.movedim(0, dim).contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, -1)


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1)


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _split(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, tensor_parallel_output_grad):
        ctx.dim, ctx.tp_grad = dim, tensor_parallel_output_grad
        return _gather(x, dim)

    @staticmethod
    def backward(ctx, grad):
        # A TP-split consumer leaves each rank with a partial gradient: sum it while scattering.
        if ctx.tp_grad:
            return _reduce_scatter(grad, ctx.dim), None, None
        return _split(grad, ctx.dim), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _reduce_scatter(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim), None


def _identity_at_tp1(fn):
    def wrapped(x, *args, **kwargs):
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return x
        return fn(x, *args, **kwargs)
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


@_identity_at_tp1
def copy_to_tensor_model_parallel_region(x):
    """Enter a TP region with a replicated input: identity forward, all-reduce of the gradient."""
    return _CopyToTP.apply(x)


@_identity_at_tp1
def reduce_from_tensor_model_parallel_region(x):
    """Leave a TP region by summing partial results: all-reduce forward, identity backward."""
    return _ReduceFromTP.apply(x)


@_identity_at_tp1
def scatter_to_tensor_model_parallel_region(x):
    """Keep this rank's slice of the last dim; the gradient is all-gathered."""
    return _ScatterToTP.apply(x)


@_identity_at_tp1
def gather_from_tensor_model_parallel_region(x):
    """All-gather the last dim (rank-major concatenation); the gradient is split back."""
    return _GatherFromTP.apply(x)


@_identity_at_tp1
def scatter_to_sequence_parallel_region(x, dim: int = 0):
    """Keep this rank's block of rows along ``dim``; the gradient is all-gathered."""
    return _ScatterToSP.apply(x, dim)


@_identity_at_tp1
def gather_from_sequence_parallel_region(x, dim: int = 0, tensor_parallel_output_grad: bool = True):
    """All-gather rows along ``dim``. Backward: reduce-scatter when the consumer is TP-split
    (each rank holds a partial gradient, e.g. a column-parallel linear), else plain split."""
    return _GatherFromSP.apply(x, dim, tensor_parallel_output_grad)


@_identity_at_tp1
def reduce_scatter_to_sequence_parallel_region(x, dim: int = 0):
    """Sum partial results over TP and keep this rank's rows along ``dim``; grad is all-gathered."""
    return _ReduceScatterToSP.apply(x, dim)
