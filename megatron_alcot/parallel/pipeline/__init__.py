"""Pipeline parallelism with latent laps: stage construction, p2p messages, schedule
(docs/architecture.md §8).

    from megatron_alcot.parallel.pipeline import build_pipeline_stage, forward_backward_pipelining_with_laps
    from megatron_alcot.optim.tied_embedding import allreduce_tied_embedding_grads
    stage = build_pipeline_stage(model_cfg, parallel_cfg, seed=1234)
    infos = forward_backward_pipelining_with_laps(forward_step_func=step, data_iterator=it,
                                                  model=stage, num_microbatches=4)
    allreduce_tied_embedding_grads(stage)

Files: ``build.py`` (layer split, this rank's stage), ``p2p.py`` (static-shape
messages between stages), ``lap_schedule.py`` (the forward rounds around the ring and the lap-cut
backward).
"""
from megatron_alcot.parallel.pipeline.build import build_pipeline_stage, layer_ranges, parse_layer_split
from megatron_alcot.parallel.pipeline.lap_schedule import (backward_rounds,
                                                           forward_backward_pipelining_with_laps,
                                                           infos_from_last_stage)

__all__ = ["build_pipeline_stage", "layer_ranges", "parse_layer_split",
           "forward_backward_pipelining_with_laps", "backward_rounds", "infos_from_last_stage"]
