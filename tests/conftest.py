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
