"""Pipeline stages of the model: the layer split and this rank's stage.

    stage = build_pipeline_stage(model_cfg, parallel_cfg, seed=1234)         # after initialize_model_parallel
    stage = build_pipeline_stage(cfg, pcfg, layer_split="3,5")               # explicit layers per stage
    layer_ranges(8, 2) == [(0, 4), (4, 8)]; layer_ranges(8, 2, "3,5") == [(0, 3), (3, 8)]

The model draws every weight from a generator seeded by (seed, parameter name) and names layers by
their global index, so the stages of any split hold exactly the weights of the PP = 1 model.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

from megatron_alcot.config import ConfigError
from megatron_alcot.model import build_model
from megatron_alcot.parallel import parallel_state

LayerSplit = Union[None, str, Sequence[int]]


def parse_layer_split(split: LayerSplit) -> Optional[List[int]]:
    """``"3,5"`` / ``[3, 5]`` -> ``[3, 5]``; None stays None (even split)."""
    if split is None or (isinstance(split, str) and not split.strip()):
        return None
    if isinstance(split, str):
        try:
            return [int(x) for x in split.replace(" ", "").split(",")]
        except ValueError:
            raise ConfigError(f"--pipeline-layer-split {split!r}: give one layer count per stage, "
                              "comma-separated, e.g. 3,5") from None
    return [int(x) for x in split]


def layer_ranges(num_layers: int, pipeline_size: int, split: LayerSplit = None) -> List[Tuple[int, int]]:
    """``(start, end)`` of the global layers of each stage.

    Without ``split`` the layers are cut evenly, the first stages taking one more when the count
    does not divide (the last stage also holds the LM head, the first the embedding).
    """
    counts = parse_layer_split(split)
    if counts is None:
        if num_layers < pipeline_size:
            raise ConfigError(f"--num-layers {num_layers} is smaller than --pipeline-model-parallel-size "
                              f"{pipeline_size}; every stage needs at least one layer")
        base, extra = divmod(num_layers, pipeline_size)
        counts = [base + (1 if i < extra else 0) for i in range(pipeline_size)]
    else:
        if len(counts) != pipeline_size:
            raise ConfigError(f"--pipeline-layer-split {','.join(map(str, counts))} has {len(counts)} "
                              f"entries; give one per stage (--pipeline-model-parallel-size "
                              f"{pipeline_size})")
        if min(counts) < 1 or sum(counts) != num_layers:
            raise ConfigError(f"--pipeline-layer-split {','.join(map(str, counts))}: every stage needs "
                              f">= 1 layer and the counts must sum to --num-layers {num_layers}")
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    return ranges


def build_pipeline_stage(model_cfg, parallel_cfg=None, seed: int = 1234, *, layer_split: LayerSplit = None,
                         pipeline_rank: Optional[int] = None, pipeline_size: Optional[int] = None):
    """Build this rank's stage: embedding on the first, final norm / LM head / latent method on the
    last, and its slice of the layers. ``layer_split`` defaults to
    ``parallel_cfg.pipeline_layer_split`` when the config has it; ``pipeline_rank`` /
    ``pipeline_size`` default to the process groups (pass them to build stages in one process)."""
    pp = pipeline_size if pipeline_size is not None else parallel_state.get_pipeline_model_parallel_world_size()
    rank = pipeline_rank if pipeline_rank is not None else parallel_state.get_pipeline_model_parallel_rank()
    if layer_split is None:
        layer_split = getattr(parallel_cfg, "pipeline_layer_split", None)
    if pp > 1 and model_cfg.latent_method == "ponder":
        raise NotImplementedError(
            "--latent-method ponder feeds the LM-head distribution back through the input embedding, "
            "so the last stage would need the embedding of the first; use "
            "--pipeline-model-parallel-size 1 with ponder (tensor and data parallelism work)")
    ranges = layer_ranges(model_cfg.num_layers, pp, layer_split)
    return build_model(model_cfg, parallel_cfg, pre_process=rank == 0, post_process=rank == pp - 1,
                       layer_range=ranges[rank], seed=seed)
