import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _deterministic_threads():
    import torch
    torch.use_deterministic_algorithms(False)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: spawns process worlds or trains for many steps (seconds each)")
    config.addinivalue_line("markers", "system: needs system services the test setup installs (Slurm, Open MPI)")
    config.addinivalue_line("markers", "probe: times real kernels of this machine (megatron_alcot.hardware)")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny matmuls only gain contention from threads on shared CI cores.

        pytestmark = pytest.mark.usefixtures("one_thread")
    """
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def machine_is():
    """Install a fake machine (``machine_is(fake_machine(...))``); the process's own answers come back after."""
    from megatron_alcot import hardware
    saved = hardware._MACHINE

    def install(m):
        hardware.set_machine(m)
        return m
    yield install
    hardware.set_machine(saved)
