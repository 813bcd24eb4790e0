"""Validation loss, perplexity and mean executed latent steps.

    result = evaluate(ddp_model, make_iterator(), eval_iters=10, num_microbatches=4,
                      forward_step=make_forward_step(cfg, device, autocast_dtype),
                      pipeline_model_parallel_size=1, autocast_dtype=None)
    result["lm_loss"], result["ppl"], result["mean_latent_steps"], result["depth_share"]

``ddp_model`` is the trainer's wrapper (``optim.grad_sync``); its ``module`` runs. Each of the
``eval_iters`` passes runs the training schedule with ``forward_only=True`` (with PP > 1
the lap pipeline; ``data_iterator`` may be None on middle stages), so every rank of every stage gets
the same numbers. Perplexity is ``exp`` of the language-model loss (the readout's cross entropy), not
of the total loss that includes the adaptive term.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import torch

from megatron_alcot.optim.grad_sync import GradSyncModel
from megatron_alcot.training.schedules import get_forward_backward_func
from megatron_alcot.training.train_step import gather_stage_infos, reduce_stats, unpack_stats


@torch.no_grad()
def evaluate(model: GradSyncModel, data_iterator: Optional[Iterator], *, eval_iters: int, num_microbatches: int,
             forward_step: Callable, pipeline_model_parallel_size: int = 1,
             autocast_dtype: Optional[torch.dtype] = None) -> dict:
    inner = model.module
    was_training = inner.training
    inner.eval()
    fb = get_forward_backward_func(pipeline_model_parallel_size, autocast_dtype)
    infos = []
    try:
        for _ in range(eval_iters):
            infos += fb(forward_step_func=forward_step, data_iterator=data_iterator, model=inner,
                        num_microbatches=num_microbatches, forward_only=True)
    finally:
        inner.train(was_training)
    device = next(inner.parameters()).device
    total = reduce_stats(gather_stage_infos(infos, inner.config, device, pipeline_model_parallel_size))
    stats = unpack_stats(total.cpu())
    total_depth = sum(stats.depth_counts) or 1.0
    return {"loss": stats.loss, "lm_loss": stats.lm_loss, "latent_loss": stats.latent_loss,
            "ppl": math.exp(min(stats.lm_loss, 700.0)),
            "mean_latent_steps": stats.mean_latent_steps,
            "depth_share": [c / total_depth for c in stats.depth_counts]}
