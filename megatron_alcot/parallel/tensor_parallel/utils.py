"""Small helpers shared by the tensor-parallel modules: sizes, vocab ranges, init functions,
parameter attributes and the dim-0 collectives (with torch's old names as fallback).

    divide(8, 2)                                       # 4, or ValueError naming both numbers
    vocab_range(per_partition=512, rank=1)             # (512, 1024)
    init = init_method_normal(0.02); init(torch.empty(4, 4))
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

TP_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride")


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    if numerator % denominator:
        raise ValueError(f"{what} {numerator} is not divisible by the tensor-model-parallel "
                         f"size {denominator}")
    return numerator // denominator


def vocab_range(per_partition: int, rank: int) -> tuple:
    """``[start, end)`` of the global vocabulary rows held by TP rank ``rank``."""
    return rank * per_partition, (rank + 1) * per_partition


def init_method_normal(std: float):
    """``init(tensor)`` that fills ``tensor`` in place from N(0, std^2)."""
    def init_(tensor):
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)
    return init_


def scaled_init_method_normal(std: float, num_layers: int):
    """Output-projection init: N(0, (std / sqrt(2 * num_layers))^2)."""
    return init_method_normal(std / math.sqrt(2.0 * num_layers))


def padded_vocab_init(init_method, vocab_size: int):
    """Init for a vocab-padded weight ``[V_padded, h]``: rows ``< vocab_size`` get ``init_method``
    (drawn as a ``[vocab_size, h]`` block, so they do not depend on the padding), padding rows
    are zero. ``sharding.repad_vocab`` also pads with zeros, so re-padding after a TP change
    reproduces exactly what a fresh init at the new padding would hold in the padding rows.
    """
    def init_(tensor):
        init_method(tensor[:vocab_size])
        tensor[vocab_size:].zero_()
        return tensor
    return init_


def set_tensor_model_parallel_attributes(param, is_parallel: bool, dim: int, stride: int = 1):
    param.tensor_model_parallel = is_parallel
    param.partition_dim = dim
    param.partition_stride = stride


def param_is_tensor_parallel(param) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


# --- dim-0 collectives ----------------------------------------------------------------------
def all_gather_dim0(x: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (equal shapes on all ranks)."""
    x = x.contiguous()
    out = torch.empty((world_size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)
    return out


def reduce_scatter_dim0(x: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's ``1/world_size`` block of dim 0."""
    rows = divide(x.shape[0], world_size, "rows to reduce-scatter")
    x = x.contiguous()
    out = torch.empty((rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x, op=dist.ReduceOp.SUM, group=group)
    return out
