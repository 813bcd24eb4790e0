"""Fixed-depth baselines of the paper's comparisons (docs/method.md §9), on the lap contract.

    cfg = preset("tiny", latent_method="loop", latent_max_steps=3)    # or "pause", "ponder"
    out = build_model(cfg)(tokens, labels=labels, loss_mask=loss_mask)
    out.loss, out.num_steps                                          # num_steps == K everywhere

* ``loop.LoopMethod``: the layer stack applied K+1 times, plain causal per lap (``reuse_kv=False``).
* ``pause.PauseMethod``: K pause slots per token at the token's position, one lap over the
  interleaved sequence of length (K+1)·T, logits at the last pause slot.
* ``ponder.PonderMethod``: K+1 laps, lap k+1 reads ``s·E[x] + softmax(W_U h_k)·(s·W_E)``.

They share :class:`FixedDepthMethod`: every token runs K extra steps, the loss is the CE of the
last lap's logits and ``latent_loss`` is 0.
"""
from __future__ import annotations

import torch

from megatron_alcot.model.latent.base import LatentMethod
from megatron_alcot.model.output import ModelOutput, masked_mean
from megatron_alcot.parallel.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy


class FixedDepthContext:
    """Per-micro-batch state of the last stage: labels, loss mask and the final hidden state."""

    def __init__(self, batch: int, seq: int, device, labels, loss_mask, return_logits):
        self.labels = labels
        self.loss_mask = (loss_mask.float() if loss_mask is not None
                          else torch.ones(batch, seq, device=device))
        self.return_logits = labels is None if return_logits is None else return_logits
        self.final_hidden = None       # [b, T, h] after the final norm, set by the last lap
        self.logits = None             # set instead when the method computed them already


class FixedDepthMethod(LatentMethod):
    """A method whose every token runs exactly K = ``latent_max_steps`` extra steps."""

    def __init__(self, cfg, pre_process: bool = True, post_process: bool = True):
        super().__init__(cfg, pre_process, post_process)
        self.max_latent_steps = cfg.latent_max_steps

    def token_shape(self, lap) -> tuple:
        """(batch, tokens) of the micro-batch from a lap state (pause laps are longer)."""
        return tuple(lap.active.shape)

    def begin(self, model, lap, labels=None, loss_mask=None, halting="learned",
              return_logits=None, **unused):
        b, s = self.token_shape(lap)
        return FixedDepthContext(b, s, lap.active.device, labels, loss_mask, return_logits)

    def finish(self, model, ctx: FixedDepthContext) -> ModelOutput:
        fused = ctx.logits is None and ctx.labels is not None and not ctx.return_logits
        logits = None
        if not fused:
            logits = ctx.logits if ctx.logits is not None else model.lm_head(ctx.final_hidden)
        b, s = ctx.loss_mask.shape
        k1 = self.max_latent_steps + 1
        device = ctx.loss_mask.device
        out = ModelOutput(
            num_steps=torch.full((b, s), self.max_latent_steps, dtype=torch.int64, device=device),
            # all mass on the last step (one_hot would check its input's range: two host syncs)
            exit_mass=(torch.arange(k1, device=device) == k1 - 1).float().expand(b, s, k1).clone(),
            lap_active=torch.full((k1,), b * s, dtype=torch.int64, device=device),
            lap_executed=torch.ones(k1, b, s, dtype=torch.bool, device=device))
        if ctx.return_logits:
            out.logits = logits
        if ctx.labels is not None:
            if fused:
                out.lm_loss, out.per_token_loss = model.lm_loss(ctx.final_hidden, ctx.labels, ctx.loss_mask)
            else:
                out.per_token_loss = vocab_parallel_cross_entropy(logits, ctx.labels)
                out.lm_loss = masked_mean(out.per_token_loss, ctx.loss_mask)
            out.latent_loss = torch.zeros((), device=device)
            out.loss = out.lm_loss + out.latent_loss
        return out


__all__ = ["FixedDepthContext", "FixedDepthMethod"]
