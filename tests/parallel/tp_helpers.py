"""Helpers for the tensor-parallel tests: gather shards over the TP group and compare."""
import torch
import torch.distributed as dist

from megatron_alcot.parallel import parallel_state
from megatron_alcot.parallel.tensor_parallel import merge_shards, shard_tensor


def gather_tp(t: torch.Tensor):
    world = parallel_state.get_tensor_model_parallel_world_size()
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return out


def merged(t: torch.Tensor, dim: int, stride: int = 1) -> torch.Tensor:
    """The full tensor from every TP rank's shard ``t``."""
    return merge_shards(gather_tp(t), dim % t.dim(), stride)


def my_shard(full: torch.Tensor, dim: int, stride: int = 1) -> torch.Tensor:
    return shard_tensor(full, dim % full.dim(), stride, parallel_state.get_tensor_model_parallel_rank(),
                        parallel_state.get_tensor_model_parallel_world_size())


def close(actual, expected, what, atol=2e-5, rtol=1e-5):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
