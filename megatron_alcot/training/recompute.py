"""Activation recomputation (``--recompute-granularity``) applied from outside the model.

    apply_recompute(model, granularity="full", method=None, num_layers=None)

``full`` checkpoints whole transformer layers (``model.decoder.layers``); with ``--recompute-method
block --recompute-num-layers N`` only the first N layers, with ``uniform`` every layer.
``selective`` checkpoints only each layer's attention sub-module. Checkpointing is
``torch.utils.checkpoint`` with ``use_reentrant=False``, which accepts the keys/values a lap
passes in and returns, and restores the RNG state for the recomputation. ``model`` is the model
itself (a pipeline stage), not a data-parallel wrapper.
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch
from torch.utils.checkpoint import checkpoint

from megatron_alcot.model.llama import LlamaModel


def _wrap(module: torch.nn.Module) -> None:
    original = module.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        return checkpoint(original, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def find_layers(model: LlamaModel) -> List[torch.nn.Module]:
    """This stage's transformer layers in order."""
    return list(model.decoder.layers.values())


def apply_recompute(model: LlamaModel, granularity: Optional[str], method: Optional[str] = None,
                    num_layers: Optional[int] = None) -> int:
    """Wrap the chosen layers; returns how many modules were wrapped."""
    if granularity is None:
        return 0
    layers = find_layers(model)
    if granularity == "full" and method == "block" and num_layers:
        layers = layers[:num_layers]
    wrapped = 0
    for layer in layers:
        target = layer if granularity == "full" else getattr(layer, "self_attention", None)
        if target is not None:
            _wrap(target)
            wrapped += 1
    return wrapped
