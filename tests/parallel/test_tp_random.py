"""RNG tracker semantics in one process (the TP-distinct streams are checked in test_tp_layers)."""
import pytest
import torch

from megatron_alcot.parallel.tensor_parallel import RNGStatesTracker, get_rng_tracker, model_parallel_seed


def test_fork_uses_its_own_stream_and_restores_the_default():
    model_parallel_seed(5)
    with get_rng_tracker().fork():
        a1 = torch.rand(3)
    outside = torch.rand(3)
    with get_rng_tracker().fork():
        a2 = torch.rand(3)
    stream = torch.Generator().manual_seed(5 + 2718)
    assert torch.equal(a1, torch.rand(3, generator=stream))
    assert torch.equal(a2, torch.rand(3, generator=stream)), "the forked stream continues"
    torch.manual_seed(5)
    assert torch.equal(outside, torch.rand(3)), "fork leaves the default generator where it was"


def test_states_round_trip_for_checkpoints():
    model_parallel_seed(11)
    tracker = get_rng_tracker()
    saved = tracker.get_states()
    with tracker.fork():
        first = torch.rand(4)
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(torch.rand(4), first)


def test_tracker_errors():
    tracker = RNGStatesTracker()
    tracker.add("a", 1)
    with pytest.raises(ValueError):
        tracker.add("b", 1)
    with pytest.raises(ValueError):
        tracker.add("a", 2)
    with pytest.raises(KeyError, match="model_parallel_seed"):
        with tracker.fork("missing"):
            pass


def test_seed_makes_init_reproducible():
    from megatron_alcot.parallel.tensor_parallel import ColumnParallelLinear
    model_parallel_seed(3)
    w1 = ColumnParallelLinear(4, 6).weight
    model_parallel_seed(3)
    assert torch.equal(ColumnParallelLinear(4, 6).weight, w1)
