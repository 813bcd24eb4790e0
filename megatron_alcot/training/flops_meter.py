"""FLOPs of what executed (docs/method.md §10) and the resulting TFLOP/s and MFU.

    meter = FlopsMeter(model_cfg, tp=1)
    flops = meter.micro_batch_flops(num_steps)      # num_steps: [b, s] executed latent steps ℓ_t
    meter.tflops_per_device(total_flops, seconds, world_size)   # -> TFLOP/s
    meter.mfu(tflops, peak_tflops)                  # -> fraction, None without --peak-flops

The count is :func:`megatron_alcot.model.flops.training_flops`, the one formula the benches and the
paper table use too.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_alcot.model.flops import training_flops


class FlopsMeter:
    def __init__(self, model_cfg, tp: int = 1):
        self.cfg = model_cfg
        self.tp = tp

    def micro_batch_flops(self, num_steps: torch.Tensor) -> float:
        """Forward + backward FLOPs of one micro-batch (all TP ranks together)."""
        return training_flops(self.cfg, num_steps)

    @staticmethod
    def tflops_per_device(total_flops: float, seconds: float, world_size: int) -> float:
        if seconds <= 0:
            return 0.0
        return total_flops / seconds / max(world_size, 1) / 1e12

    @staticmethod
    def mfu(tflops_per_device: float, peak_tflops: Optional[float]) -> Optional[float]:
        if not peak_tflops:
            return None
        return tflops_per_device / peak_tflops
