"""Forward-backward schedules over the micro-batches of one global batch (DESIGN §4).

    fb = get_forward_backward_func(pipeline_model_parallel_size=1)
    outputs = fb(forward_step_func=step, data_iterator=it, model=ddp_model, num_microbatches=8)

``forward_step_func(batch, model) -> (loss, info)``: ``loss`` is the micro-batch's scalar loss,
``info`` anything the caller wants back (detached statistics). The schedule divides each loss by
the number of micro-batches (so the accumulated gradient is that of the mean), applies
``scale_loss`` (fp16 loss scaling) and runs backward; with a data-parallel wrapper every micro-batch
but the last runs under ``model.no_sync()``, so the gradient all-reduce overlaps only the last
backward. With ``forward_only=True`` no backward runs (evaluation).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional

import torch


def forward_backward_no_pipelining(*, forward_step_func: Callable, data_iterator: Iterator,
                                   model: torch.nn.Module, num_microbatches: int,
                                   forward_only: bool = False,
                                   scale_loss: Optional[Callable] = None) -> List:
    outputs = []
    no_sync = getattr(model, "no_sync", None)
    for i in range(num_microbatches):
        last = i == num_microbatches - 1
        sync_ctx = no_sync() if (no_sync is not None and not last and not forward_only) \
            else contextlib.nullcontext()
        with sync_ctx:
            batch = next(data_iterator)
            loss, info = forward_step_func(batch, model)
            if not forward_only:
                scaled = loss / num_microbatches
                if scale_loss is not None:
                    scaled = scale_loss(scaled)
                scaled.backward()
        outputs.append(info)
    return outputs


def get_forward_backward_func(pipeline_model_parallel_size: int = 1) -> Callable:
    """The schedule for this layout; pipeline schedules with latent laps are not implemented yet."""
    if pipeline_model_parallel_size > 1:
        raise NotImplementedError(
            "pipeline parallelism (--pipeline-model-parallel-size > 1) has no training schedule yet; "
            "use tensor and data parallelism")
    return forward_backward_no_pipelining
