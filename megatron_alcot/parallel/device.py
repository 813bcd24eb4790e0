"""The one place that knows about CUDA: device choice, transfers and the device RNG.

    from megatron_alcot.parallel import device
    dev = device.get_device()          # cuda:<current device> when CUDA is available, else cpu
    x = device.to_device(torch.zeros(3))

``launch.init_distributed`` calls :func:`set_device` with the local rank, so afterwards
``get_device()`` is ``cuda:local_rank`` on GPU nodes. Setting ``MEGATRON_ALCOT_DEVICE=cpu``
forces the CPU even where CUDA is present (e.g. gloo tests on a GPU machine).
"""
from __future__ import annotations

import os

import torch


def cuda_available() -> bool:
    if os.environ.get("MEGATRON_ALCOT_DEVICE", "").lower() == "cpu":
        return False
    return torch.cuda.is_available()


def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    return "nccl" if cuda_available() else "gloo"


def set_device(local_rank: int) -> None:
    """Bind this process to GPU ``local_rank`` (no-op on CPU)."""
    if cuda_available():
        torch.cuda.set_device(local_rank % max(torch.cuda.device_count(), 1))


def get_device() -> torch.device:
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(t, non_blocking: bool = False):
    """Move a tensor (or a module) to :func:`get_device`."""
    return t.to(get_device(), non_blocking=non_blocking)


def synchronize() -> None:
    if cuda_available():
        torch.cuda.synchronize()


# --- RNG of the device where dropout runs (used by tensor_parallel.random) -------------------
def get_rng_state() -> torch.Tensor:
    """State of the default generator of :func:`get_device` (CPU or current CUDA device)."""
    if cuda_available():
        return torch.cuda.get_rng_state()
    return torch.get_rng_state()


def set_rng_state(state: torch.Tensor) -> None:
    if cuda_available():
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


def new_rng_state(seed: int) -> torch.Tensor:
    """A generator state for :func:`get_device` seeded with ``seed``; touches no live generator."""
    gen = torch.Generator(device=get_device())
    gen.manual_seed(seed)
    return gen.get_state()
