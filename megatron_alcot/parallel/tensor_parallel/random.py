"""TP-aware random numbers, on CPU and CUDA alike.

    model_parallel_seed(1234)          # default generators: same on every TP rank
    layer = ColumnParallelLinear(...)  # TP-consistent init (every TP rank draws the same full weight)
    y = F.dropout(x, 0.1)              # replicated region: same mask on every TP rank
    with get_rng_tracker().fork():     # TP-split region (e.g. attention probs of my heads):
        z = F.dropout(z, 0.1)          # a different stream per TP rank
    ckpt["rng_tracker"] = get_rng_tracker().get_states()
    get_rng_tracker().set_states(ckpt["rng_tracker"])

``fork`` swaps the default generator of ``device.get_device()`` (the CPU generator on CPU, the
current CUDA generator on GPU) for the named tracked state and back, saving the advanced state.
Callers that want different data-parallel or pipeline streams fold that into ``seed`` themselves
(e.g. ``seed + 100 * pp_rank``); the model then has to make its init PP-consistent on its own.
"""
from __future__ import annotations

import contextlib
from typing import Dict

import torch

from megatron_alcot.parallel import device, parallel_state

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718


class RNGStatesTracker:
    """Named generator states that can be swapped in with :meth:`fork`."""

    def __init__(self):
        self._states: Dict[str, torch.Tensor] = {}
        self._seeds = set()

    def reset(self) -> None:
        self._states, self._seeds = {}, set()

    def add(self, name: str, seed: int) -> None:
        if seed in self._seeds:
            raise ValueError(f"seed {seed} is already tracked")
        if name in self._states:
            raise ValueError(f"RNG state {name!r} is already tracked")
        self._seeds.add(seed)
        self._states[name] = device.new_rng_state(seed)

    def get_states(self) -> Dict[str, torch.Tensor]:
        """Copies of the tracked states (for checkpoints)."""
        return {name: s.clone() for name, s in self._states.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self._states = {name: s.clone() for name, s in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self._states:
            raise KeyError(f"RNG state {name!r} is not tracked; call model_parallel_seed(seed) first")
        outside = device.get_rng_state()
        device.set_rng_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = device.get_rng_state()
            device.set_rng_state(outside)


def get_rng_tracker() -> RNGStatesTracker:
    """The process's tracker (kept in the process-group registry)."""
    reg = parallel_state._REGISTRY
    if reg.rng_tracker is None:
        reg.rng_tracker = RNGStatesTracker()
    return reg.rng_tracker


def model_parallel_seed(seed: int) -> None:
    """Seed the default generators with ``seed`` (identical across TP ranks) and the tracker's
    ``model-parallel-rng`` with ``seed + 2718 + tp_rank`` (distinct per TP rank)."""
    torch.manual_seed(seed)   # CPU and every CUDA device
    tracker = get_rng_tracker()
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, seed + _TP_SEED_OFFSET + parallel_state.get_tensor_model_parallel_rank())
