import pytest
import torch

from dist_utils import run_distributed

pytestmark = pytest.mark.slow


def _sum_ranks(rank, world_size, base):
    import torch.distributed as dist
    t = torch.tensor([float(base + rank)])
    dist.all_reduce(t)
    return t.item()


def test_run_distributed_collects_all_ranks():
    assert run_distributed(_sum_ranks, 2, 10) == [21.0, 21.0]
