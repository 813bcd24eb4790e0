"""The DeepSpeed engine's own state inside our checkpoint directory (``--deepspeed-config``).

    >>> save_checkpoint(d, it, model, None, sched, ..., full_params=lambda: full_parameters(engine),
    ...                 engine_state=lambda tmp: save_engine_state(engine, tmp))
    >>> info = load_checkpoint(d, model, None, sched, load_model=False)
    >>> load_engine_state(engine, info["path"], info["metadata"], load_optim=True)

The trainer writes the usual checkpoint directory (``checkpoint.py``: full model weights,
scheduler, RNG and metadata, committed atomically), and :func:`save_engine_state` adds the
engine's own state under ``deepspeed/`` (its ``engine.save_checkpoint``: the ZeRO-partitioned
optimizer and fp32 master weights). Resuming (:func:`load_engine_state`) needs the same ZeRO stage
and data-parallel size; the model files also serve ``tools/checkpoint/convert_to_hf.py`` and runs
without DeepSpeed (``--no-load-optim``). DeepSpeed reads its own files with its own loader
(pickle), ours are read with ``torch.load(weights_only=True)``. ``deepspeed`` is imported only
where ZeRO-3 parameters must be gathered.
"""
from __future__ import annotations

import contextlib

from megatron_alcot.checkpointing.metadata import CheckpointError
from megatron_alcot.parallel import parallel_state

ENGINE_DIR = "deepspeed"       # the engine's own files inside an iter_NNNNNNN checkpoint directory


def full_parameters(engine):
    """Context in which every parameter holds its full value (ZeRO-3 gathers them; other stages
    keep full parameters on every rank anyway)."""
    if engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed  # noqa: PLC0415
    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def save_engine_state(engine, directory: str) -> dict:
    """The engine's state into ``directory/deepspeed`` (collective); returns the metadata section."""
    engine.save_checkpoint(directory, tag=ENGINE_DIR, client_state={}, save_latest=False)
    return {"name": "deepspeed", "dir": ENGINE_DIR, "zero_stage": int(engine.zero_optimization_stage()),
            "dp": parallel_state.get_data_parallel_world_size()}


def load_engine_state(engine, path: str, metadata: dict, load_optim: bool = True) -> None:
    """Restore the engine's module (and optimizer) state from the checkpoint directory ``path``."""
    saved = metadata.get("engine") or {}
    here = {"zero_stage": int(engine.zero_optimization_stage()), "dp": parallel_state.get_data_parallel_world_size()}
    if saved.get("name") != "deepspeed":
        raise CheckpointError(f"{path} was not written through DeepSpeed (no {ENGINE_DIR}/ state); "
                              "resume it without --deepspeed-config, or start from its weights with "
                              "--finetune")
    if load_optim and (saved.get("zero_stage"), saved.get("dp")) != (here["zero_stage"], here["dp"]):
        raise CheckpointError(f"{path} holds DeepSpeed state of ZeRO-{saved.get('zero_stage')} at data-"
                              f"parallel size {saved.get('dp')}; this run is ZeRO-{here['zero_stage']} at "
                              f"{here['dp']}: launch the saved layout, or pass --no-load-optim to keep "
                              "only the weights")
    loaded, _ = engine.load_checkpoint(path, tag=saved.get("dir", ENGINE_DIR),
                                       load_optimizer_states=load_optim, load_lr_scheduler_states=False,
                                       load_module_only=not load_optim)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed found no state under {path}/{saved.get('dir', ENGINE_DIR)}")
