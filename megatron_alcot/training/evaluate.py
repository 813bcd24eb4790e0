"""Validation loss, perplexity and mean executed latent steps.

    result = evaluate(model, make_iterator(), eval_iters=10, num_microbatches=4,
                      forward_step=make_forward_step(cfg, device, autocast_dtype))
    result["lm_loss"], result["ppl"], result["mean_latent_steps"], result["depth_share"]

Perplexity is ``exp`` of the language-model loss (the readout's cross entropy), not of the total
loss that includes the adaptive term.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from megatron_alcot.training.train_step import reduce_stats, unpack_stats


def _unwrap(model):
    return getattr(model, "module", model)


@torch.no_grad()
def evaluate(model, data_iterator: Iterator, *, eval_iters: int, num_microbatches: int,
             forward_step: Callable) -> dict:
    inner = _unwrap(model)
    was_training = inner.training
    inner.eval()
    infos = []
    try:
        for _ in range(eval_iters * num_microbatches):
            _, info = forward_step(next(data_iterator), inner)
            infos.append(info)
    finally:
        inner.train(was_training)
    stats = unpack_stats(reduce_stats(infos))
    total = sum(stats.depth_counts) or 1.0
    return {"loss": stats.loss, "lm_loss": stats.lm_loss, "latent_loss": stats.latent_loss,
            "ppl": math.exp(min(stats.lm_loss, 700.0)),
            "mean_latent_steps": stats.mean_latent_steps,
            "depth_share": [c / total for c in stats.depth_counts]}
