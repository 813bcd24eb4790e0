"""Process-group registry: tensor (TP), pipeline (PP) and data (DP) parallel groups.

Ranks are laid out TP fastest, then DP, then PP (Megatron's ``tp-dp-pp`` order)::

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

Usage::

    from megatron_alcot.parallel import parallel_state
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=1)
    parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_world_size()
    parallel_state.destroy_model_parallel()

Every getter works without ``torch.distributed``: sizes are 1, ranks 0 and groups ``None``.
When ``torch.distributed`` is initialised but :func:`initialize_model_parallel` was not called,
the getters describe TP = PP = 1 with every rank a data-parallel replica (the DP group is then
``None``, i.e. the default world group; TP/PP groups are ``None`` and have size 1, so no layer
communicates over them).

The registry (``_REGISTRY``) is the only module-level mutable state of the package; the TP-aware
RNG tracker lives in it too (see ``tensor_parallel.random``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

import torch.distributed as dist


@dataclass
class _Registry:
    initialized: bool = False
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    tp_group: Any = None
    pp_group: Any = None
    dp_group: Any = None
    mp_group: Any = None
    embedding_group: Any = None
    tp_ranks: List[int] = field(default_factory=list)
    pp_ranks: List[int] = field(default_factory=list)
    dp_ranks: List[int] = field(default_factory=list)
    embedding_ranks: List[int] = field(default_factory=list)
    rng_tracker: Any = None   # created lazily by tensor_parallel.random


_REGISTRY = _Registry()


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _global_rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _global_world() -> int:
    return dist.get_world_size() if _dist_on() else 1


def rank_layout(world_size: int, tp: int, pp: int) -> dict:
    """Rank lists of every group for a world, without creating anything.

        >>> rank_layout(4, tp=2, pp=1)["tp"]
        [[0, 1], [2, 3]]

    Returns ``{"tp", "dp", "pp", "mp", "embedding"}`` -> list of rank lists.
    """
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor ({tp}) and pipeline ({pp}) model-parallel sizes must be >= 1")
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by tensor-model-parallel size {tp} x "
            f"pipeline-model-parallel size {pp}; launch a multiple of {tp * pp} processes "
            f"or change --tensor-model-parallel-size / --pipeline-model-parallel-size")
    dp = world_size // (tp * pp)

    def rank(p, d, t):
        return p * dp * tp + d * tp + t

    layout = {
        "tp": [[rank(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[rank(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[rank(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "mp": [[rank(p, d, t) for p in range(pp) for t in range(tp)] for d in range(dp)],
    }
    # Tied input/output embeddings live on the first and the last stage of each pipeline.
    layout["embedding"] = [sorted({g[0], g[-1]}) for g in layout["pp"]]
    return layout


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1) -> None:
    """Create the TP, PP, DP, model-parallel (TP x PP) and embedding groups.

    Every rank must call this with the same sizes (group creation is collective). Without
    ``torch.distributed`` only TP = PP = 1 is possible and all groups stay ``None``.
    """
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if _REGISTRY.initialized:
        raise RuntimeError("model parallel groups are already initialised; "
                           "call parallel_state.destroy_model_parallel() first")
    world = _global_world()
    if not _dist_on() and tp * pp > 1:
        raise RuntimeError(f"tensor-model-parallel size {tp} x pipeline-model-parallel size {pp} needs "
                           "torch.distributed: call launch.init_distributed() first (and launch "
                           f"{tp * pp}·k processes with torchrun, srun or mpirun)")
    layout = rank_layout(world, tp, pp)
    reg = _REGISTRY
    reg.tp_size, reg.pp_size, reg.dp_size = tp, pp, world // (tp * pp)
    me = _global_rank()
    for kind, attr in (("tp", "tp"), ("dp", "dp"), ("pp", "pp"), ("mp", "mp"),
                       ("embedding", "embedding")):
        for ranks in layout[kind]:
            # new_group is collective over the whole world: every rank creates every group.
            group = dist.new_group(ranks) if _dist_on() else None
            if me in ranks:
                setattr(reg, f"{attr}_group", group)
                if kind != "mp":
                    setattr(reg, f"{attr}_ranks", list(ranks))
    reg.initialized = True


def destroy_model_parallel() -> None:
    """Forget all groups (the RNG tracker is kept). Safe to call when nothing was initialised."""
    tracker = _REGISTRY.rng_tracker
    _REGISTRY.__init__()
    _REGISTRY.rng_tracker = tracker


def model_parallel_is_initialized() -> bool:
    return _REGISTRY.initialized


# --- tensor model parallel ------------------------------------------------------------------
def get_tensor_model_parallel_group():
    return _REGISTRY.tp_group


def get_tensor_model_parallel_world_size() -> int:
    return _REGISTRY.tp_size if _REGISTRY.initialized else 1


def get_tensor_model_parallel_rank() -> int:
    if not _REGISTRY.initialized:
        return 0
    return _REGISTRY.tp_ranks.index(_global_rank()) if _REGISTRY.tp_ranks else 0


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 in this rank's TP group (for broadcasts within the group)."""
    return _REGISTRY.tp_ranks[0] if _REGISTRY.tp_ranks else _global_rank()


# --- pipeline model parallel ----------------------------------------------------------------
def get_pipeline_model_parallel_group():
    return _REGISTRY.pp_group


def get_pipeline_model_parallel_world_size() -> int:
    return _REGISTRY.pp_size if _REGISTRY.initialized else 1


def get_pipeline_model_parallel_rank() -> int:
    if not _REGISTRY.initialized:
        return 0
    return _REGISTRY.pp_ranks.index(_global_rank()) if _REGISTRY.pp_ranks else 0


def get_pipeline_model_parallel_ranks() -> List[int]:
    """Global ranks of this rank's pipeline, stage 0 first."""
    return list(_REGISTRY.pp_ranks) if _REGISTRY.pp_ranks else [_global_rank()]


def is_pipeline_first_stage() -> bool:
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage() -> bool:
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def get_pipeline_model_parallel_first_rank() -> int:
    return get_pipeline_model_parallel_ranks()[0]


def get_pipeline_model_parallel_last_rank() -> int:
    return get_pipeline_model_parallel_ranks()[-1]


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next stage (wraps around: the last stage's next is stage 0)."""
    ranks = get_pipeline_model_parallel_ranks()
    return ranks[(get_pipeline_model_parallel_rank() + 1) % len(ranks)]


def get_pipeline_model_parallel_prev_rank() -> int:
    """Global rank of the previous stage (wraps around: stage 0's previous is the last stage)."""
    ranks = get_pipeline_model_parallel_ranks()
    return ranks[(get_pipeline_model_parallel_rank() - 1) % len(ranks)]


# --- data parallel --------------------------------------------------------------------------
def get_data_parallel_group():
    return _REGISTRY.dp_group


def get_data_parallel_world_size() -> int:
    return _REGISTRY.dp_size if _REGISTRY.initialized else _global_world()


def get_data_parallel_rank() -> int:
    if not _REGISTRY.initialized:
        return _global_rank()
    return _REGISTRY.dp_ranks.index(_global_rank()) if _REGISTRY.dp_ranks else 0


def get_data_parallel_ranks() -> List[int]:
    return list(_REGISTRY.dp_ranks) if _REGISTRY.dp_ranks else list(range(_global_world()))


# --- model parallel (TP x PP) and tied embeddings -------------------------------------------
def get_model_parallel_group():
    """TP x PP ranks that together hold one model replica (e.g. for global grad-norm clipping)."""
    return _REGISTRY.mp_group


def get_model_parallel_world_size() -> int:
    return get_tensor_model_parallel_world_size() * get_pipeline_model_parallel_world_size()


def get_embedding_group():
    """First and last pipeline stage of this pipeline (all-reduce tied embedding grads here)."""
    return _REGISTRY.embedding_group


def get_embedding_ranks() -> List[int]:
    return list(_REGISTRY.embedding_ranks) if _REGISTRY.embedding_ranks else [_global_rank()]


def is_rank_in_embedding_group() -> bool:
    return _global_rank() in get_embedding_ranks()


def get_global_rank() -> int:
    return _global_rank()


def get_world_size() -> int:
    return _global_world()


def describe() -> str:
    """One line for logs: ``rank 3: tp 1/2 pp 0/2 dp 1/1``."""
    return (f"rank {_global_rank()}: tp {get_tensor_model_parallel_rank()}/"
            f"{get_tensor_model_parallel_world_size()} pp {get_pipeline_model_parallel_rank()}/"
            f"{get_pipeline_model_parallel_world_size()} dp {get_data_parallel_rank()}/"
            f"{get_data_parallel_world_size()}")
