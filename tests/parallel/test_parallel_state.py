"""Process-group registry: rank layout and getters, single-process and on a world of 4."""
import pytest
import torch

from dist_utils import run_distributed
from megatron_alcot.parallel import parallel_state

CONFIGS = [(2, 1), (1, 2), (2, 2), (4, 1)]


def test_getters_without_torch_distributed():
    assert not parallel_state.model_parallel_is_initialized()
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    assert parallel_state.get_tensor_model_parallel_rank() == 0
    assert parallel_state.get_tensor_model_parallel_group() is None
    assert parallel_state.get_pipeline_model_parallel_world_size() == 1
    assert parallel_state.get_pipeline_model_parallel_rank() == 0
    assert parallel_state.get_data_parallel_world_size() == 1 and parallel_state.get_data_parallel_rank() == 0
    assert parallel_state.get_data_parallel_group() is None and parallel_state.get_pipeline_model_parallel_group() is None
    assert parallel_state.is_pipeline_first_stage() and parallel_state.is_pipeline_last_stage()
    assert parallel_state.get_pipeline_model_parallel_next_rank() == 0
    assert parallel_state.get_pipeline_model_parallel_prev_rank() == 0
    parallel_state.initialize_model_parallel(1, 1)
    try:
        assert parallel_state.model_parallel_is_initialized()
        assert parallel_state.get_tensor_model_parallel_group() is None
        assert parallel_state.get_embedding_ranks() == [0]
        with pytest.raises(RuntimeError, match="already initialised"):
            parallel_state.initialize_model_parallel(1, 1)
    finally:
        parallel_state.destroy_model_parallel()
    assert not parallel_state.model_parallel_is_initialized()
    with pytest.raises(RuntimeError, match="init_distributed"):
        parallel_state.initialize_model_parallel(2, 1)
    assert not parallel_state.model_parallel_is_initialized()


def test_rank_layout_formula():
    for tp, pp in CONFIGS:
        dp = 4 // (tp * pp)
        lay = parallel_state.rank_layout(4, tp, pp)
        for rank in range(4):
            t, d, p = rank % tp, (rank // tp) % dp, rank // (tp * dp)
            assert rank == p * dp * tp + d * tp + t
            assert [g for g in lay["tp"] if rank in g] == [[p * dp * tp + d * tp + i for i in range(tp)]]
            assert [g for g in lay["dp"] if rank in g] == [[p * dp * tp + i * tp + t for i in range(dp)]]
            assert [g for g in lay["pp"] if rank in g] == [[i * dp * tp + d * tp + t for i in range(pp)]]
    assert parallel_state.rank_layout(8, 2, 2)["embedding"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    with pytest.raises(ValueError, match="not divisible"):
        parallel_state.rank_layout(4, 3, 1)


def _group_members(group, rank, world_size):
    import torch.distributed as dist
    mask = torch.zeros(world_size)
    mask[rank] = 1
    dist.all_reduce(mask, group=group)
    return [i for i in range(world_size) if mask[i] > 0]


def _check_all_configs(rank, world_size):
    for tp, pp in CONFIGS:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        dp = world_size // (tp * pp)
        t, d, p = rank % tp, (rank // tp) % dp, rank // (tp * dp)
        lay = parallel_state.rank_layout(world_size, tp, pp)
        mine = {k: next(g for g in lay[k] if rank in g) for k in lay}
        assert (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()) == (tp, t)
        assert (parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()) == (dp, d)
        assert (parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_rank()) == (pp, p)
        assert parallel_state.get_model_parallel_world_size() == tp * pp
        assert parallel_state.get_tensor_model_parallel_src_rank() == mine["tp"][0]
        # The groups really contain the ranks the layout says.
        assert _group_members(parallel_state.get_tensor_model_parallel_group(), rank, world_size) == mine["tp"]
        assert _group_members(parallel_state.get_data_parallel_group(), rank, world_size) == mine["dp"]
        assert _group_members(parallel_state.get_pipeline_model_parallel_group(), rank, world_size) == mine["pp"]
        assert _group_members(parallel_state.get_model_parallel_group(), rank, world_size) == sorted(mine["mp"])
        assert parallel_state.get_embedding_ranks() == mine["embedding"]
        assert parallel_state.is_rank_in_embedding_group() == (p in (0, pp - 1))
        if parallel_state.is_rank_in_embedding_group():
            assert _group_members(parallel_state.get_embedding_group(), rank, world_size) == mine["embedding"]
        ring = mine["pp"]
        assert parallel_state.get_pipeline_model_parallel_next_rank() == ring[(p + 1) % pp]
        assert parallel_state.get_pipeline_model_parallel_prev_rank() == ring[(p - 1) % pp]
        assert parallel_state.is_pipeline_first_stage() == (p == 0)
        assert parallel_state.is_pipeline_last_stage() == (p == pp - 1)
        parallel_state.destroy_model_parallel()
    # Not initialised but torch.distributed is: TP = PP = 1, every rank a DP replica.
    assert parallel_state.get_data_parallel_world_size() == world_size
    assert parallel_state.get_data_parallel_rank() == rank
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    try:
        parallel_state.initialize_model_parallel(3, 1)
    except ValueError as e:
        assert "not divisible" in str(e)
    else:
        raise AssertionError("world 4 with TP 3 must fail")
    return True


@pytest.mark.slow
def test_rank_layout_world4_all_configs():
    assert run_distributed(_check_all_configs, 4) == [True] * 4
