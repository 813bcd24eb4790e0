"""Model-free pipeline primitives (docs/architecture.md §8): asynchronous messages between stages.

    from megatron_alcot.parallel.pipeline import p2p
    link = p2p.StageLink(spec, next_rank, prev_rank, group)

The schedule that drives them lives above the model, in
:mod:`megatron_alcot.training.pipeline_schedule`; the layer split and this rank's stage in
:mod:`megatron_alcot.model.pipeline_split`; the tied-embedding gradient sum in
:mod:`megatron_alcot.optim.tied_embedding`.
"""
from megatron_alcot.parallel.pipeline import p2p

__all__ = ["p2p"]
