"""Activation recomputation (``--recompute-granularity``) applied from outside the model.

    apply_recompute(model, granularity="full", method=None, num_layers=None)

``full`` checkpoints whole transformer layers (``model.decoder.layers``); with ``--recompute-method
block --recompute-num-layers N`` only the first N layers, with ``uniform`` every layer.
``selective`` checkpoints only each layer's attention sub-module. Checkpointing is
``torch.utils.checkpoint`` with ``use_reentrant=False``, which accepts the keys/values a lap
passes in and returns, and restores the RNG state for the recomputation. A model that offers
``configure_recompute(granularity, method, num_layers)`` is asked to do it itself.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint


def _wrap(module: torch.nn.Module) -> None:
    original = module.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        return checkpoint(original, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def find_layers(model: torch.nn.Module):
    inner = getattr(model, "module", model)
    decoder = getattr(inner, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise RuntimeError("--recompute-granularity: the model has no decoder.layers to checkpoint")
    return list(layers.values()) if isinstance(layers, torch.nn.ModuleDict) else list(layers)


def apply_recompute(model: torch.nn.Module, granularity: Optional[str], method: Optional[str] = None,
                    num_layers: Optional[int] = None) -> int:
    """Wrap the chosen layers; returns how many modules were wrapped."""
    if granularity is None:
        return 0
    inner = getattr(model, "module", model)
    if hasattr(inner, "configure_recompute"):
        inner.configure_recompute(granularity, method, num_layers)
        return -1
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
