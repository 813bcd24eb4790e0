"""shard_tensor / merge_shards round trips, state-dict helpers and vocab re-padding."""
import pytest
import torch

from megatron_alcot.parallel.tensor_parallel import (
    ColumnParallelLinear, RowParallelLinear, merge_shards, merge_state_dicts, repad_vocab,
    shard_state_dict, shard_tensor, tensor_parallel_meta)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("dim,stride", [(0, 1), (1, 1), (0, 2), (1, 2)])
def test_shard_merge_round_trip(world, dim, stride):
    full = torch.arange(16 * 8, dtype=torch.float32).reshape(16, 8)
    shards = [shard_tensor(full, dim, stride, r, world) for r in range(world)]
    assert all(s.shape[dim] == full.shape[dim] // world for s in shards)
    assert torch.equal(merge_shards(shards, dim, stride), full)


def test_stride2_is_gate_up_per_rank():
    gate, up = torch.arange(8.0).reshape(8, 1), 100 + torch.arange(8.0).reshape(8, 1)
    full = torch.cat([gate, up])
    shard = shard_tensor(full, 0, 2, rank=1, world_size=2)
    assert torch.equal(shard, torch.cat([gate[4:], up[4:]]))


def test_uneven_split_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot be split"):
        shard_tensor(torch.zeros(6, 2), 0, 2, 0, 2)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = ColumnParallelLinear(4, 16, stride=2)
        self.fc2 = RowParallelLinear(8, 4, bias=True)
        self.norm = torch.nn.Parameter(torch.ones(4))


def test_state_dict_shard_merge_round_trip():
    model = _Tiny()
    meta = tensor_parallel_meta(model)
    assert meta == {"fc1.weight": {"partition_dim": 0, "stride": 2},
                    "fc2.weight": {"partition_dim": 1, "stride": 1}}
    full = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    sds = [shard_state_dict(full, model, r, 2) for r in range(2)]
    assert sds[1]["fc1.weight"].shape == (8, 4) and sds[1]["fc2.weight"].shape == (4, 4)
    assert sds[1]["norm"] is full["norm"] and sds[0]["fc2.bias"] is full["fc2.bias"]
    back = merge_state_dicts(sds, meta)
    assert set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in full)


def test_repad_vocab():
    w = torch.randn(5, 3)
    padded = repad_vocab(w, 8)
    assert padded.shape == (8, 3) and torch.equal(padded[:5], w) and not padded[5:].any()
    assert torch.equal(repad_vocab(padded, 5), w)
    assert torch.equal(repad_vocab(torch.randn(2, 5), 7, dim=1)[:, 5:], torch.zeros(2, 2))
