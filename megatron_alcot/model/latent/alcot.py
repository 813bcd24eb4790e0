"""ALCoT, token-level adaptive latent chain of thought (docs/method.md §2-§6), as a latent method.

    method = model.latent                               # ALCoTMethod; routers: latent.routers.{k}
    lap = method.first_lap(model, tokens)               # lap 0: s·E[x], all active, reach 1
    ctx = method.begin(model, lap, labels, loss_mask)
    lap = method.end_lap(model, ctx, lap, hidden)       # after lap k: next LapState or None
    out = method.finish(model, ctx)                     # ModelOutput: loss, num_steps, ...

After lap k, on the last stage, ``end_lap`` takes the final norm's ``h_{·,k}``; below ℓmax the
router gives ``g_{·,k}`` and the halting update (``router.py``) the next reach, the tokens that go
on and this lap's exit mass; the exit mass weights ``h`` into the readout (``hidden``), or the
lap's distribution into the mixture (``prob``); the tokens that go on add
``r_{t,k+1}·sg(p_{t,k}(y_t))^β`` to the adaptive loss. ``finish`` turns the readout into the
LM loss. ``vanilla`` is this class with ℓmax = 0.
"""
from __future__ import annotations

import torch

from megatron_alcot.model.latent.base import LatentMethod
from megatron_alcot.model.latent.router import Routers, check_halting, halting_update
from megatron_alcot.model.output import LapState, ModelOutput, masked_mean
from megatron_alcot.parallel.tensor_parallel.cross_entropy import (chunked_target_prob,
                                                                   vocab_parallel_cross_entropy,
                                                                   vocab_parallel_log_softmax)


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
                                        gemm_backend=model.spec.gemm)
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
