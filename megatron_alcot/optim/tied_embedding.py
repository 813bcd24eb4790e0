"""The tied input embedding / LM head split over pipeline stages: one gradient for both copies.

    ...forward-backward of all micro-batches...
    allreduce_tied_embedding_grads(model.module)   # first: the embedding copies get the summed gradient
    model.finish_grad_sync()                       # then the data-parallel (or ZeRO sharded) reduction
    optimizer.step()

With PP > 1 and tied weights the first stage holds the input embedding and the last stage a copy
(``output_layer.weight``, marked ``shared_embedding``). Their gradients are summed over the
embedding group *before* the data-parallel reduction: a ZeRO optimizer reduce-scatters the flat
gradient buffer, after which a rank holds only its own range reduced (and under ZeRO-2 frees the
rest), so a later sum would mix reduced, stale and freed values. The gradient norm counts the
tied weight once (the ``shared_embedding`` copy is left out of it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_alcot.model.llama import LlamaModel
from megatron_alcot.parallel import parallel_state


def tied_embedding_weight(stage: LlamaModel) -> Optional[torch.Tensor]:
    """The copy of the tied embedding this stage holds when it is split from its twin, else None.
    ``stage`` is the model itself (a wrapper's ``module``)."""
    if stage.config.untie_embeddings_and_output_weights or (stage.pre_process and stage.post_process):
        return None
    if stage.pre_process:
        return stage.embedding.word_embeddings.weight
    if stage.post_process:
        return stage.output_layer.weight
    return None


def allreduce_tied_embedding_grads(stage: LlamaModel) -> None:
    """Sum the gradients of the input embedding (first stage) and its tied LM-head copy (last
    stage) over the embedding group, so both copies take the same step. No-op with PP = 1,
    untied weights, or on middle stages. Call before the data-parallel gradient reduction."""
    weight = tied_embedding_weight(stage)
    if weight is None or parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=parallel_state.get_embedding_group())
