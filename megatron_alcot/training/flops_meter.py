"""FLOPs of what executed (docs/method.md §10) and the resulting TFLOP/s and MFU.

    meter = FlopsMeter(model_cfg, tp=1)
    flops = meter.micro_batch_flops(num_steps)      # num_steps: [b, s] executed latent steps ℓ_t
    meter.tflops_per_device(total_flops, seconds, world_size)   # -> TFLOP/s
    meter.mfu(tflops, peak_tflops)                  # -> fraction, None without --peak-flops

The count uses ``megatron_alcot.model.flops.training_flops`` when the model package provides it;
otherwise the same analytic formula is evaluated here: ``6·N_dense·Σ_t(1+ℓ_t)`` for the layer
matmuls, attention with ``(k+1)·(t+1)`` visible keys for query ``(t, k)``, the LM head once per
token (forward + backward), and the no-grad per-step target probabilities (forward only,
``2·h·V`` per executed step before the last).
"""
from __future__ import annotations

from typing import Optional

import torch


def _dense_params_per_layer(cfg) -> int:
    h, hd = cfg.hidden_size, cfg.head_dim
    q = cfg.num_attention_heads * hd
    kv = cfg.query_groups * hd
    return h * (q + 2 * kv) + q * h + 3 * h * cfg.ffn_size


def analytic_training_flops(cfg, num_steps: torch.Tensor) -> float:
    """Training FLOPs (forward + backward) of one micro-batch given ``num_steps`` [b, s]."""
    steps = num_steps.to(torch.float64)
    b, s = steps.shape
    token_passes = float((1.0 + steps).sum())
    dense = 6.0 * cfg.num_layers * _dense_params_per_layer(cfg) * token_passes
    # Query (t, k) sees (k+1)(t+1) keys; Σ_{k=0..ℓ} (k+1) = (ℓ+1)(ℓ+2)/2.
    pos = torch.arange(1, s + 1, dtype=torch.float64)
    key_pairs = float(((steps + 1) * (steps + 2) / 2 * pos).sum())
    width = cfg.num_attention_heads * cfg.head_dim
    attention = 3.0 * 4.0 * width * key_pairs * cfg.num_layers
    vocab = cfg.padded_vocab_size()
    head = 6.0 * cfg.hidden_size * vocab * b * s
    target_probs = 2.0 * cfg.hidden_size * vocab * float(steps.sum())
    return dense + attention + head + target_probs


class FlopsMeter:
    def __init__(self, model_cfg, tp: int = 1):
        self.cfg = model_cfg
        self.tp = tp
        self._counter = None
        try:
            from megatron_alcot.model import flops as model_flops  # written by the model package
            self._counter = getattr(model_flops, "training_flops", None)
        except Exception:
            self._counter = None

    def micro_batch_flops(self, num_steps: torch.Tensor) -> float:
        if self._counter is not None:
            try:
                value = self._counter(self.cfg, num_steps)
                return float(value.get("total", 0.0)) if isinstance(value, dict) else float(value)
            except TypeError:
                pass
        return analytic_training_flops(self.cfg, num_steps)

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
