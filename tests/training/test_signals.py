"""DistributedSignalHandler records SIGTERM instead of dying, and every rank agrees on it."""
import os
import signal

import pytest
import torch

from dist_utils import run_distributed
from megatron_alcot.training.signals import DistributedSignalHandler


def test_records_signal_and_restores_previous_handler():
    before = signal.getsignal(signal.SIGTERM)
    with DistributedSignalHandler() as handler:
        assert not handler.signals_received()
        os.kill(os.getpid(), signal.SIGTERM)        # would end the process without the handler
        assert handler.signals_received() and handler.local_signal_received()
    assert signal.getsignal(signal.SIGTERM) is before


def test_other_signal_numbers():
    with DistributedSignalHandler(signal.SIGUSR1) as handler:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.signals_received()


def _one_rank_signalled(rank, world):
    with DistributedSignalHandler() as handler:
        seen = [handler.signals_received()]
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        seen.append(handler.signals_received())      # collective: rank 0 learns of rank 1's signal
        seen.append(handler.local_signal_received())
    t = torch.zeros(1)
    torch.distributed.all_reduce(t)                  # the world still works afterwards
    return seen


@pytest.mark.slow
def test_all_ranks_agree():
    assert run_distributed(_one_rank_signalled, 2) == [[False, True, False], [False, True, True]]
