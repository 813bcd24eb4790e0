"""Analytic FLOPs of what executed (docs/method.md §10), for ALCoT and the fixed-depth baselines.

    flops = training_flops(cfg, num_steps)              # num_steps: [b, s] ℓ_t of one micro-batch
    flops = forward_flops(cfg, num_steps)               # inference: forward only, no target probs
    nominal = nominal_training_flops(cfg, batch, seq)   # every token runs ℓmax (K) steps
    parts = flops_breakdown(cfg, num_steps, training=True, loss_mask=None)   # dict of the terms

Counted per model replica (all TP ranks together), multiply-add = 2 FLOPs, backward = 2× forward:

* dense: ``2·N_dense`` per token-pass forward (``6·`` in training), ``N_dense`` = the layers'
  matmul weights (QKV, output projection, SwiGLU fc1/fc2); ALCoT runs ``Σ_t (1+ℓ_t)`` token-passes.
* attention: ``4·heads·head_dim`` per (query, visible key) pair and layer forward (scores and
  weighted values; ``12·`` in training); for ALCoT the pairs are counted exactly over the 2-D
  mask: Σ over executed queries (t, k) of the executed keys (t', k') with t' ≤ t and k' ≤ k.
* head: the LM head ``2·h·V`` per readout and token forward (V = padded vocabulary), once per
  token for the hidden readout, once per executed (t, k) for the probability readout.
* target_probs: the no-grad ``sg(p_{t,k}(y_t))`` of the latent loss, ``2·h·V`` per (t, k) with
  k < ℓ_t (training with λ > 0 only; no backward).
* router: ``2·h`` per decision (executed (t, k) with k < ℓmax), ``6·h`` in training.
* ponder_embed: PonderLM's ``P·W_E`` products, ``2·h·V`` per token and ponder step (``6·`` training).

Baselines: loop = K+1 passes over T tokens (attention within each pass); pause = one pass over
(K+1)·T interleaved slots (causal attention over the whole expanded sequence, ≈ (K+1)² the pairs);
ponder = K+1 passes plus the K extra vocabulary-sized products per token for the logits and
``P·W_E``; vanilla = one pass.
"""
from __future__ import annotations

from typing import Optional

import torch


def dense_params(cfg) -> int:
    """N_dense: matmul weights one token-pass goes through (all layers, no embedding or head)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.query_groups * hd
    return cfg.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * cfg.ffn_size)


def executed_mask(num_steps: torch.Tensor, max_latent_steps: int) -> torch.Tensor:
    """``[b, ℓmax+1, s]`` bool: (t, k) executed iff k ≤ ℓ_t."""
    ks = torch.arange(max_latent_steps + 1, device=num_steps.device)
    return ks[None, :, None] <= num_steps[:, None, :]


def visible_key_pairs(num_steps: torch.Tensor, max_latent_steps: int) -> int:
    """Σ over executed queries (t, k) of the executed keys (t', k') with t' ≤ t, k' ≤ k."""
    ex = executed_mask(num_steps, max_latent_steps).to(torch.int64)
    visible = ex.cumsum(dim=2).cumsum(dim=1)     # keys with t' ≤ t (inclusive), then k' ≤ k
    return int((visible * ex).sum())


def causal_pairs(length: int) -> int:
    """Query-key pairs of one plain causal pass over ``length`` positions."""
    return length * (length + 1) // 2


def flops_breakdown(cfg, num_steps: torch.Tensor, training: bool = True,
                    loss_mask: Optional[torch.Tensor] = None) -> dict:
    """The FLOPs terms (see the module docstring) and their ``total`` for one micro-batch."""
    num_steps = torch.as_tensor(num_steps).to(torch.int64)
    b, s = num_steps.shape
    h, vocab = cfg.hidden_size, cfg.padded_vocab_size()
    width = cfg.num_attention_heads * cfg.head_dim
    K = cfg.max_latent_steps
    mult = 3.0 if training else 1.0          # forward + backward = 3× forward
    tokens = b * s
    method = cfg.latent_method
    terms = dict(dense=0.0, attention=0.0, head=0.0, target_probs=0.0, router=0.0, ponder_embed=0.0)
    if method in ("alcot", "vanilla"):
        ell = num_steps.clamp(0, K)
        passes = tokens + int(ell.sum())
        pairs = visible_key_pairs(ell, K)
        readouts = tokens if cfg.latent_readout == "hidden" else passes
        terms["head"] = mult * 2.0 * h * vocab * readouts
        terms["router"] = mult * 2.0 * h * int((ell + 1).clamp_max(K).sum())
        if training and cfg.latent_loss_weight > 0:
            penalised = ell if loss_mask is None else ell * (torch.as_tensor(loss_mask) > 0)
            terms["target_probs"] = 2.0 * h * vocab * int(penalised.sum())
    elif method in ("loop", "ponder"):
        passes = (K + 1) * tokens
        pairs = (K + 1) * b * causal_pairs(s)
        terms["head"] = mult * 2.0 * h * vocab * (tokens if method == "loop" else passes)
        if method == "ponder":
            terms["ponder_embed"] = mult * 2.0 * h * vocab * K * tokens
    elif method == "pause":
        passes = (K + 1) * tokens
        pairs = b * causal_pairs((K + 1) * s)
        terms["head"] = mult * 2.0 * h * vocab * tokens
    else:
        raise ValueError(f"no FLOPs formula for latent_method {method!r}")
    terms["dense"] = mult * 2.0 * dense_params(cfg) * passes
    terms["attention"] = mult * 4.0 * width * cfg.num_layers * pairs
    terms["token_passes"] = passes
    terms["key_pairs"] = pairs
    terms["total"] = sum(terms[k] for k in ("dense", "attention", "head", "target_probs", "router",
                                            "ponder_embed"))
    return terms


def training_flops(cfg, num_steps: torch.Tensor, seq_length: Optional[int] = None,
                   loss_mask: Optional[torch.Tensor] = None) -> float:
    """Forward + backward FLOPs of one micro-batch with executed steps ``num_steps [b, s]``.

    ``seq_length`` is only checked against ``num_steps`` (the shape carries it)."""
    _check_shape(num_steps, seq_length)
    return flops_breakdown(cfg, num_steps, True, loss_mask)["total"]


def forward_flops(cfg, num_steps: torch.Tensor, seq_length: Optional[int] = None) -> float:
    """Forward-only (evaluation / inference prefill) FLOPs; no per-step target probabilities."""
    _check_shape(num_steps, seq_length)
    return flops_breakdown(cfg, num_steps, False)["total"]


def nominal_training_flops(cfg, batch: int, seq: int) -> float:
    """Training FLOPs at fixed depth: every token runs ℓmax (K) latent steps."""
    return training_flops(cfg, torch.full((batch, seq), cfg.max_latent_steps, dtype=torch.int64))


def _check_shape(num_steps, seq_length):
    if seq_length is not None and torch.as_tensor(num_steps).shape[-1] != seq_length:
        raise ValueError(f"num_steps has {torch.as_tensor(num_steps).shape[-1]} tokens per row, "
                         f"seq_length is {seq_length}")
