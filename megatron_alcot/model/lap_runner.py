"""The loop over laps (PP = 1), the latent-method registry, and ALCoT's readout and loss.

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

from megatron_alcot.model.output import LapState, ModelOutput, masked_mean
from megatron_alcot.model.router import Routers, check_halting, halting_update
from megatron_alcot.parallel.tensor_parallel.cross_entropy import (chunked_target_prob,
                                                                   vocab_parallel_cross_entropy,
                                                                   vocab_parallel_log_softmax)

METHOD_CLASSES = MappingProxyType({
    "vanilla": "megatron_alcot.model.lap_runner:ALCoTMethod",
    "alcot": "megatron_alcot.model.lap_runner:ALCoTMethod",
    "loop": "megatron_alcot.model.baselines.loop:LoopMethod",
    "pause": "megatron_alcot.model.baselines.pause:PauseMethod",
    "ponder": "megatron_alcot.model.baselines.ponder:PonderMethod",
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


class ALCoTContext:
    """Per-micro-batch accumulators of the last stage across laps."""

    def __init__(self, lap: LapState, labels, loss_mask, halting, return_lap_hidden, return_logits):
        b, s = lap.active.shape
        self.labels = labels
        self.loss_mask = (loss_mask.float() if loss_mask is not None
                          else torch.ones(b, s, device=lap.active.device))
        self.halting = halting
        self.return_lap_hidden = return_lap_hidden
        self.return_logits = return_logits
        self.readout = None                      # Σ e_k h_k (fp32), hidden readout
        self.penalty = torch.zeros(b, s, device=lap.active.device)
        self.hidden, self.exit, self.executed, self.g = [], [], [], []


class ALCoTMethod(LatentMethod):
    """Adaptive latent CoT (and vanilla = ℓmax 0): routers, halting, exit-mass readout, loss."""

    def __init__(self, cfg, pre_process: bool = True, post_process: bool = True):
        super().__init__(cfg, pre_process, post_process)
        self.max_latent_steps = cfg.max_latent_steps
        if post_process and self.max_latent_steps > 0:
            self.routers = Routers(cfg.hidden_size, self.max_latent_steps, cfg.latent_router_init_prob)

    def begin(self, model, lap, labels=None, loss_mask=None, halting="learned",
              return_lap_hidden=False, return_logits=None, **unused):
        check_halting(halting)
        if return_logits is None:
            return_logits = labels is None
        return ALCoTContext(lap, labels, loss_mask, halting, return_lap_hidden, return_logits)

    def end_lap(self, model, ctx: ALCoTContext, lap: LapState, hidden: torch.Tensor):
        cfg, k = self.cfg, lap.k
        h = model.decoder.final_layernorm(hidden)
        ctx.executed.append(lap.active)
        next_lap = None
        if k < self.max_latent_steps:
            g = self.routers.continue_prob(k, h)
            r_next, cont, exit_mass = halting_update(lap.reach, g, lap.active, cfg.latent_threshold,
                                                   k, ctx.halting)
            ctx.g.append(torch.where(lap.active, g, 0.0))
            penalize = ctx.labels is not None and cfg.latent_loss_weight > 0
            sel = None
            if penalize:
                sel = (lap.active if cfg.latent_loss_scope == "decided" else cont) & (ctx.loss_mask > 0)
            # The lap's one host sync: whether a next lap runs, its compaction sizes, and how many
            # tokens the penalty covers.
            per_row = cont.sum(1)
            n_next, m_next, n_sel = torch.stack([per_row.sum(), per_row.max(),
                                                 sel.sum() if penalize else per_row.sum()]).tolist()
            if penalize:
                ctx.penalty = ctx.penalty + self._penalty(model, ctx, h, r_next, sel, n_sel)
            if n_next > 0:
                next_lap = LapState(h, cont, r_next, k + 1, lap.position_ids, sizes=(n_next, m_next))
        else:
            exit_mass = torch.where(lap.active, lap.reach, 0.0)
        ctx.exit.append(exit_mass)
        if cfg.latent_readout == "hidden":
            # Without latent steps every exit mass is 1: skip the multiply (bit-identical).
            term = h.float() if self.max_latent_steps == 0 else exit_mass.unsqueeze(-1) * h.float()
            ctx.readout = term if ctx.readout is None else ctx.readout + term
        if cfg.latent_readout == "prob" or ctx.return_lap_hidden:
            ctx.hidden.append(h)
        return next_lap

    def _penalty(self, model, ctx, h, r_next, sel, n_sel: int):
        """``r_{t,k+1}·sg(p_{t,k}(y_t))^β`` for each router decision k of a token: only where it goes
        on to step k+1 (k < ℓ_t, scope "continued"), or also at the decision that halts it (scope
        "decided"), which keeps pushing the halting router towards stopping confident tokens.
        ``sel`` marks those tokens and ``n_sel`` (host int) counts them, so no op here syncs."""
        cfg = self.cfg
        p = torch.zeros_like(r_next)
        if n_sel > 0:
            rows = sel.reshape(-1).nonzero_static(size=n_sel).squeeze(1)
            hidden = h.detach().reshape(-1, h.shape[-1]).index_select(0, rows)
            probs = chunked_target_prob(hidden, model.output_weight.detach(),
                                        ctx.labels.reshape(-1).index_select(0, rows),
                                        cfg.latent_prob_chunk, vocab_size=cfg.vocab_size,
                                        gemm_backend=cfg.cpu_gemm_backend)
            p = p.reshape(-1).index_copy(0, rows, probs).view_as(r_next)
        return torch.where(sel, r_next * p.pow(cfg.latent_loss_beta), 0.0)

    def finish(self, model, ctx: ALCoTContext) -> ModelOutput:
        n_laps = self.max_latent_steps + 1
        b, s = ctx.loss_mask.shape
        executed = torch.stack(ctx.executed + [torch.zeros_like(ctx.executed[0])] * (n_laps - len(ctx.executed)))
        exit_mass = torch.stack(ctx.exit + [torch.zeros_like(ctx.exit[0])] * (n_laps - len(ctx.exit)), -1)
        out = ModelOutput(
            num_steps=executed[1:].sum(0).to(torch.int64),
            exit_mass=exit_mass,
            lap_active=executed.sum((1, 2)).to(torch.int64),
            lap_executed=executed,
            continue_prob=(torch.stack(ctx.g + [torch.zeros_like(ctx.g[0])] * (n_laps - 1 - len(ctx.g)), -1)
                           if ctx.g else exit_mass.new_zeros(b, s, 0)),
            lap_hidden=ctx.hidden if ctx.return_lap_hidden else None)
        if self.cfg.latent_readout == "hidden":
            logits = None
            if ctx.labels is not None and not ctx.return_logits:
                out.lm_loss, out.per_token_loss = model.lm_loss(ctx.readout, ctx.labels, ctx.loss_mask)
            else:
                logits = model.lm_head(ctx.readout)
                if ctx.labels is not None:
                    out.per_token_loss = vocab_parallel_cross_entropy(logits, ctx.labels)
        else:
            # An executed step can carry an exit mass that underflows to 0 (g saturates at 1);
            # clamping keeps log finite there, so its gradient stays 0 instead of inf·0 = NaN.
            tiny = torch.finfo(torch.float32).tiny
            log_e = [torch.where(ex, torch.log(torch.where(ex, e, 1.0).clamp_min(tiny)), float("-inf"))
                     for ex, e in zip(ctx.executed, ctx.exit)]
            lap_logits = [model.lm_head(h) for h in ctx.hidden]
            logits = None
            if ctx.labels is not None:
                logp = torch.stack([le - vocab_parallel_cross_entropy(lg, ctx.labels)
                                    for le, lg in zip(log_e, lap_logits)])
                out.per_token_loss = -torch.logsumexp(logp, dim=0)
            if ctx.return_logits:
                # log of the mixture Σ_k e_k softmax(logits_k): its softmax is the mixture itself.
                logits = torch.logsumexp(torch.stack(
                    [le.unsqueeze(-1) + vocab_parallel_log_softmax(lg)
                     for le, lg in zip(log_e, lap_logits)]), dim=0)
        if ctx.return_logits:
            out.logits = logits
        if ctx.labels is not None:
            if out.lm_loss is None:
                out.lm_loss = masked_mean(out.per_token_loss, ctx.loss_mask)
            out.latent_loss = self.cfg.latent_loss_weight * masked_mean(ctx.penalty, ctx.loss_mask)
            out.loss = out.lm_loss + out.latent_loss
        return out


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
