"""PretrainingSampler: the global order depends on consumed samples only (DP size, resume)."""
import pytest
import torch

from megatron_alcot.config import ConfigError, DataConfig
from megatron_alcot.data.builder import build_train_valid_test_datasets
from megatron_alcot.data.sampler import PretrainingSampler, build_data_iterator


def global_order(total, consumed, mbs, dp):
    """Interleave the ranks' micro-batches step by step into the global sample order."""
    per_rank = [list(PretrainingSampler(total, consumed, mbs, r, dp)) for r in range(dp)]
    assert len({len(p) for p in per_rank}) == 1
    return [i for step in zip(*per_rank) for batch in step for i in batch]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_order_is_independent_of_dp_size(dp):
    gbs = 8
    order = global_order(1000, 0, gbs // dp, dp)
    assert order == list(range(len(order))) and len(order) == 1000
    assert len(PretrainingSampler(1000, 0, gbs // dp, 0, dp)) == 1000 // gbs


@pytest.mark.parametrize("consumed", [0, 8, 96, 512, 992])
def test_resume_continues_the_same_order(consumed):
    full = global_order(1000, 0, 2, 4)
    for dp in (1, 2, 4):
        resumed = global_order(1000, consumed, 8 // dp, dp)
        assert resumed == full[consumed:consumed + len(resumed)]


def test_drop_last_and_errors():
    s = PretrainingSampler(10, 0, 2, 1, 2, drop_last=False)
    assert list(s) == [[2, 3], [6, 7]] and len(s) == 2
    s = PretrainingSampler(11, 0, 2, 0, 2, drop_last=False)
    assert list(s) == [[0, 1], [4, 5], [8, 9]] and len(s) == 3
    with pytest.raises(ConfigError, match="consumed samples"):
        PretrainingSampler(10, 10, 2, 0, 1)
    with pytest.raises(ConfigError, match="data-parallel rank"):
        PretrainingSampler(10, 0, 2, 2, 2)


def test_data_iterator_batches_match_dataset():
    train = build_train_valid_test_datasets(DataConfig(mock_data=True, vocab_size=300), 32, 1, (64, 0, 0))[0]
    it = build_data_iterator(train, PretrainingSampler(len(train), 16, 4, 1, 2), num_workers=0)
    batch = next(it)
    assert batch["tokens"].shape == (4, 32) and batch["tokens"].dtype == torch.int64
    assert batch["labels"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
    for row, idx in enumerate(range(20, 24)):                      # consumed 16 + rank 1 of 2 x mbs 4
        assert torch.equal(batch["tokens"][row], train[idx]["tokens"])
