"""Forward-backward schedules over the micro-batches of one global batch (docs/architecture.md §2).

    fb = get_forward_backward_func(pipeline_model_parallel_size=1)        # or PP > 1: the lap pipeline
    outputs = fb(forward_step_func=step, data_iterator=it, model=ddp_model, num_microbatches=8,
                 no_sync=ddp_model.no_sync)

``forward_step_func(batch, model) -> (loss, info)``: ``loss`` is the micro-batch's scalar loss,
``info`` anything the caller wants back (detached statistics). The schedule divides each loss by
the number of micro-batches (so the accumulated gradient is that of the mean), applies
``scale_loss`` (fp16 loss scaling) and runs backward; every micro-batch but the last runs under
``no_sync()`` (the data-parallel wrapper's, ``optim.grad_sync``; default: nothing to hold back), so
the gradient reduction overlaps only the last backward. With ``forward_only=True`` no backward runs
(evaluation).

With PP > 1 the schedule is
:func:`megatron_alcot.training.pipeline_schedule.forward_backward_pipelining_with_laps` (same call;
only the last stage returns infos, the others ``[]``): 1F1B with laps by default, GPipe order with
``pipeline_schedule="gpipe"``.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager, Iterator, List, Optional

import torch


def forward_backward_no_pipelining(*, forward_step_func: Callable, data_iterator: Iterator,
                                   model: torch.nn.Module, num_microbatches: int,
                                   forward_only: bool = False,
                                   scale_loss: Optional[Callable] = None,
                                   no_sync: Callable[[], ContextManager] = contextlib.nullcontext) -> List:
    outputs = []
    for i in range(num_microbatches):
        last = i == num_microbatches - 1
        sync_ctx = no_sync() if not (last or forward_only) else contextlib.nullcontext()
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


def get_forward_backward_func(pipeline_model_parallel_size: int = 1,
                              autocast_dtype: Optional[torch.dtype] = None,
                              pipeline_schedule: str = "1f1b",
                              pipeline_max_in_flight: Optional[int] = None) -> Callable:
    """The schedule for this layout. ``autocast_dtype`` reaches the pipeline schedule, which runs
    the laps itself (with PP = 1 the step function applies autocast); ``pipeline_schedule``
    (``--pipeline-schedule``) and ``pipeline_max_in_flight`` (``--pipeline-max-in-flight``) pick its
    order and the bound on live micro-batches."""
    if pipeline_model_parallel_size > 1:
        from megatron_alcot.training.pipeline_schedule import forward_backward_pipelining_with_laps
        return functools.partial(forward_backward_pipelining_with_laps, autocast_dtype=autocast_dtype,
                                 order=pipeline_schedule, max_in_flight=pipeline_max_in_flight)
    return forward_backward_no_pipelining
