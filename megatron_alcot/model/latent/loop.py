"""Loop baseline: the whole layer stack applied K+1 times (docs/method.md §9.2).

    cfg = preset("tiny", latent_method="loop", latent_max_steps=3)
    out = build_model(cfg)(tokens, labels=labels)

``H = Layers^{K+1}(s·E[x])`` with ``s = sqrt(2.5·d)``, the same causal mask and positions in every
lap, no re-injection of the input and no final norm between laps; then the final norm and the LM
head. Each lap attends only to its own keys/values (``reuse_kv = False``).
"""
from __future__ import annotations

from megatron_alcot.model.latent.fixed_depth import FixedDepthMethod
from megatron_alcot.model.output import LapState


class LoopMethod(FixedDepthMethod):
    reuse_kv = False

    def end_lap(self, model, ctx, lap: LapState, hidden):
        if lap.k < self.max_latent_steps:
            return LapState(hidden, lap.active, lap.reach, lap.k + 1, lap.position_ids, lap.sizes)
        ctx.final_hidden = model.decoder.final_layernorm(hidden)
        return None
