"""The lap machinery every latent method shares: the hooks' base class, the method registry and
the loop over laps (PP = 1).

    out = run_laps(model, tokens, labels=labels, loss_mask=loss_mask, halting="learned")

A *latent method* is the per-method logic around the laps; it lives at ``model.latent`` (its
parameters are ``latent.*``) and implements four hooks, called by this loop or by a pipeline
schedule on the right stage::

    lap = method.first_lap(model, tokens, position_ids)      # first stage: LapState of lap 0
    ctx = method.begin(model, lap, labels, loss_mask, ...)   # last stage: per-micro-batch accumulator
    hidden, kv = model.run_lap(lap, past)                     # every stage, every lap
    lap = method.end_lap(model, ctx, lap, hidden)             # last stage: next LapState or None
    out = method.finish(model, ctx)                           # last stage: ModelOutput

``method.reuse_kv`` says whether lap k sees the keys/values of laps < k (the 2-D mask) or only
its own (plain causal, e.g. the loop baseline). ``end_lap`` receives the raw output of the last
layer and applies ``model.decoder.final_layernorm`` itself when it wants it.

Methods are looked up by ``ModelConfig.latent_method`` in ``METHOD_CLASSES`` (``"module:Class"``,
imported lazily); a new method adds one line there and subclasses :class:`LatentMethod`.
``vanilla`` is ALCoT with ℓmax = 0: the same code, so the two agree bit for bit.
"""
from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import Optional

import torch
from torch import nn

from megatron_alcot.model.output import LapState, ModelOutput

METHOD_CLASSES = MappingProxyType({
    "vanilla": "megatron_alcot.model.latent.alcot:ALCoTMethod",
    "alcot": "megatron_alcot.model.latent.alcot:ALCoTMethod",
    "loop": "megatron_alcot.model.latent.loop:LoopMethod",
    "pause": "megatron_alcot.model.latent.pause:PauseMethod",
    "ponder": "megatron_alcot.model.latent.ponder:PonderMethod",
})


def build_method(cfg, pre_process: bool = True, post_process: bool = True) -> "LatentMethod":
    module, _, cls = METHOD_CLASSES[cfg.latent_method].partition(":")
    return getattr(importlib.import_module(module), cls)(cfg, pre_process, post_process)


class LatentMethod(nn.Module):
    """Base of the per-method lap logic; see the module docstring for the hooks."""

    reuse_kv = True

    def __init__(self, cfg, pre_process: bool = True, post_process: bool = True):
        super().__init__()
        self.cfg = cfg
        self.pre_process, self.post_process = pre_process, post_process

    def first_lap(self, model, tokens: torch.Tensor, position_ids=None) -> LapState:
        """Lap 0: ``s·E[x]`` for every token, all active, reach 1."""
        x = model.embedding(tokens)
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        active = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        reach = torch.ones(tokens.shape, dtype=torch.float32, device=tokens.device)
        b, s = tokens.shape
        return LapState(x, active, reach, 0, position_ids, sizes=(b * s, s))

    def begin(self, model, lap: LapState, labels=None, loss_mask=None, **options):
        raise NotImplementedError

    def end_lap(self, model, ctx, lap: LapState, hidden: torch.Tensor) -> Optional[LapState]:
        raise NotImplementedError

    def finish(self, model, ctx) -> ModelOutput:
        raise NotImplementedError


def run_laps(model, tokens: torch.Tensor, labels=None, loss_mask=None, position_ids=None,
             halting="learned", compact: bool = True, return_kv: bool = False, **options) -> ModelOutput:
    """Every lap of one micro-batch on a single stage, one autograd graph (PP = 1).

    ``halting``: "learned" | "never" | "always" | fn(k, reach_next, active) -> bool mask
    (test hook). ``compact=False`` computes every token and masks instead of compacting.
    ``options``: ``return_lap_hidden``, ``return_logits`` (default: when ``labels`` is None).
    """
    method = model.latent
    lap = method.first_lap(model, tokens, position_ids)
    ctx = method.begin(model, lap, labels=labels, loss_mask=loss_mask, halting=halting, **options)
    past = []
    while lap is not None:
        hidden, kv = model.run_lap(lap, past if method.reuse_kv else (), compact=compact)
        if method.reuse_kv or return_kv:
            past.append(kv)
        lap = method.end_lap(model, ctx, lap, hidden)
    out = method.finish(model, ctx)
    if return_kv:
        out.kv = past
    return out
