"""Global gradient norm across tensor/pipeline (and, for sharded grads, data) parallel ranks.

    >>> norm = get_grad_norm(params)                     # float tensor, identical on every rank
    >>> clip_grads_by_norm(params, max_norm=1.0, total_norm=norm)

A parameter that every TP rank holds in full (norm weights, routers, anything without the
``tensor_model_parallel`` attribute) is counted on TP rank 0 only, so the norm equals the norm of
the single-process model. With PP > 1 and tied embeddings the last stage's LM-head copy
(``shared_embedding``) holds the same summed gradient as the first stage's embedding and is left out,
so the tied weight counts once. Gradients already averaged over data-parallel ranks are identical there
and need no reduction over DP; a DP-sharded optimizer passes its DP group in ``extra_groups``.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from megatron_alcot.parallel import parallel_state


def _counted_here(param: torch.nn.Parameter) -> bool:
    if getattr(param, "shared_embedding", False):
        return False     # the last stage's copy of the tied embedding; stage 0 counts it
    return bool(getattr(param, "tensor_model_parallel", False)) or \
        parallel_state.get_tensor_model_parallel_rank() == 0


def get_grad_norm(params: Iterable[torch.nn.Parameter],
                  extra_groups: Sequence = ()) -> torch.Tensor:
    """L2 norm (fp32 scalar tensor) of all gradients of the model, over all model-parallel ranks."""
    grads = [p.grad for p in params if p.grad is not None and _counted_here(p)]
    if grads:
        norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
        total_sq = torch.stack(norms).square().sum()
    else:
        total_sq = torch.zeros((), dtype=torch.float32)
    if dist.is_available() and dist.is_initialized():
        groups = []
        if parallel_state.get_model_parallel_world_size() > 1:
            groups.append(parallel_state.get_model_parallel_group())
        groups.extend(g for g in extra_groups if g is not None)
        for group in groups:
            dist.all_reduce(total_sq, op=dist.ReduceOp.SUM, group=group)
    return total_sq.sqrt()


def clip_grads_by_norm(params: Iterable[torch.nn.Parameter], max_norm: float,
                       total_norm: torch.Tensor) -> None:
    """Scale gradients in place by ``max_norm / total_norm`` when that is below 1."""
    if max_norm <= 0:
        return
    coeff = max_norm / (float(total_norm) + 1e-6)
    if coeff < 1.0:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coeff)


def clip_grad_norm(params, max_norm: float, extra_groups: Sequence = ()) -> torch.Tensor:
    """Norm, then clip; returns the norm before clipping."""
    params = list(params)
    norm = get_grad_norm(params, extra_groups)
    clip_grads_by_norm(params, max_norm, norm)
    return norm
