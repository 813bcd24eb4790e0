"""Pause-token baseline (docs/method.md §9.3).

    cfg = preset("tiny", latent_method="pause", latent_max_steps=3)
    out = build_model(cfg)(tokens, labels=labels)

Every token is followed by K slots holding the learned ``latent.pause_embedding`` (one vector
``[h]``, shared by all slots, as one pause token of the vocabulary would be), all at the token's
position id. One lap runs over the interleaved sequence of length (K+1)·T with a plain causal
mask, and the logits of token t are read at its last pause slot, index ``t·(K+1) + K``.

The token inputs are ``sqrt(d)·E[x]`` (``cfg.embed_scale``); the pause vector enters unscaled and
is initialised with std ``sqrt(d)·init_std`` so that both are about as large as in the reference,
where the pause token's embedding is scaled like every other token's.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_alcot.model.latent.fixed_depth import FixedDepthMethod
from megatron_alcot.model.output import LapState


class PauseMethod(FixedDepthMethod):
    def __init__(self, cfg, pre_process: bool = True, post_process: bool = True):
        super().__init__(cfg, pre_process, post_process)
        if pre_process:
            # Seeded apart from the global RNG so every TP rank holds the same vector.
            std = cfg.init_std * cfg.embed_scale
            gen = torch.Generator().manual_seed(0x9A05E)
            full = torch.empty(cfg.hidden_size, dtype=torch.float32)
            nn.init.trunc_normal_(full, 0.0, std, -3 * std, 3 * std, generator=gen)
            self.pause_embedding = nn.Parameter(full.to(getattr(torch, cfg.params_dtype)))

    @property
    def slots(self) -> int:
        return self.max_latent_steps + 1

    def token_shape(self, lap) -> tuple:
        b, n = lap.active.shape
        return b, n // self.slots

    def first_lap(self, model, tokens: torch.Tensor, position_ids=None) -> LapState:
        lap0 = super().first_lap(model, tokens, position_ids)
        b, s = tokens.shape
        u = lap0.hidden
        pause = self.pause_embedding.to(u.dtype).expand(b, s, self.max_latent_steps, -1)
        x = torch.cat([u.unsqueeze(2), pause], dim=2).reshape(b, s * self.slots, -1)
        if position_ids is None:
            position_ids = torch.arange(s, device=tokens.device).expand(b, s)
        positions = position_ids.repeat_interleave(self.slots, dim=1)
        active = torch.ones(b, s * self.slots, dtype=torch.bool, device=tokens.device)
        return LapState(x, active, active.float(), 0, positions)

    def end_lap(self, model, ctx, lap: LapState, hidden):
        b, n, h = hidden.shape
        last_slot = hidden.view(b, n // self.slots, self.slots, h)[:, :, -1]
        ctx.final_hidden = model.decoder.final_layernorm(last_slot)
        return None

