"""PonderLM baseline (docs/method.md §9.4, the PonderLM-2 repository's variant).

    cfg = preset("tiny", latent_method="ponder", latent_max_steps=3)
    out = build_model(cfg)(tokens, labels=labels)

``e_0 = s·E[x]`` with ``s = sqrt(d)``; K times ``P = softmax(W_U M(e))`` and ``e = e_0 + P·(s·W_E)``;
the logits are ``W_U M(e)`` of the last lap. Each lap is a full causal pass at the same positions
attending only to its own keys (``reuse_kv = False``); ``M`` ends with the final norm.

Tensor parallelism: the logits and the embedding weight are both split over the vocabulary.
``P·W_E`` is a partial sum per rank, all-reduced in the forward with an identity backward (the
gradient of the replicated ``e`` is already complete on every rank). The softmax normaliser
``Z = Σ_r Z_r`` is all-reduced in the forward *and* in the backward: each rank's probabilities
give ``∂L/∂Z`` only a partial sum over its own vocabulary slice. The vocabulary padding gets
probability 0 (the LM head masks its logits).

The last stage turns logits into the next lap's input, so it needs the embedding: the method
requires the whole model on one stage (PP = 1).
"""
from __future__ import annotations

import torch

from megatron_alcot.model.latent.fixed_depth import FixedDepthMethod
from megatron_alcot.model.output import LapState
from megatron_alcot.parallel.tensor_parallel import mappings
from megatron_alcot.parallel.tensor_parallel.cross_entropy import vocab_parallel_log_softmax


class PonderMethod(FixedDepthMethod):
    reuse_kv = False

    def __init__(self, cfg, pre_process: bool = True, post_process: bool = True):
        super().__init__(cfg, pre_process, post_process)
        if not (pre_process and post_process):
            raise NotImplementedError(
                "--latent-method ponder feeds the LM-head distribution back through the embedding, "
                "so it needs the whole model on one stage; use --pipeline-model-parallel-size 1")

    def begin(self, model, lap, labels=None, loss_mask=None, **options):
        ctx = super().begin(model, lap, labels=labels, loss_mask=loss_mask, **options)
        ctx.lap0_input = lap.hidden
        return ctx

    def end_lap(self, model, ctx, lap: LapState, hidden):
        logits = model.lm_head(model.decoder.final_layernorm(hidden))
        if lap.k == self.max_latent_steps:
            ctx.logits = logits
            return None
        probs = ponder_probs(logits)
        weight = model.embedding.word_embeddings.weight
        mixed = mappings.reduce_from_tensor_model_parallel_region(probs.to(weight.dtype) @ weight)
        x = ctx.lap0_input + self.cfg.embed_scale * mixed
        return LapState(x.to(ctx.lap0_input.dtype), lap.active, lap.reach, lap.k + 1,
                        lap.position_ids, lap.sizes)


def ponder_probs(logits_parallel: torch.Tensor) -> torch.Tensor:
    """This rank's slice ``[..., V_padded/tp]`` of the full-vocabulary softmax (fp32). The vocabulary
    padding gets no mass: ``model.lm_head`` already sets its logits to ``PADDED_LOGIT``."""
    return vocab_parallel_log_softmax(logits_parallel).exp()
