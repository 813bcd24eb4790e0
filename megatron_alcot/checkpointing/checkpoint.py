"""Sharded, atomic, topology-aware checkpoints (docs/architecture.md §7).

Save (every rank calls it, collectively, after the optimizer step of ``iteration``)::

    from megatron_alcot.checkpointing import save_checkpoint, load_checkpoint
    save_checkpoint("ckpts", iteration, model, optimizer, scheduler,
                    consumed_samples=consumed, config_dict={"model": model_cfg.to_dict(),
                    "parallel": parallel_cfg.__dict__, "train": ..., "data": ...},
                    data_config_hash=hash_str, extra={"anything": "json-able"})

Resume (every rank calls it, collectively, after building model/optimizer/scheduler)::

    info = load_checkpoint("ckpts", model, optimizer, scheduler)   # latest; or iteration=N
    info["iteration"], info["consumed_samples"], info["config"], info["data_config_hash"]
    info["extra"], info["path"], info["resharded"] (True when the topology differed)
    load_checkpoint("ckpts", model, load_optim=False, load_rng=False)  # weights only (finetune)

    latest_iteration("ckpts")        # int, or None when nothing is there (train from scratch)

Offline / HF converter: ``load_full_state_dict("ckpts", iteration=None, strip_vocab_padding=True)``
returns ``(full_state_dict, metadata)``: every shard merged to TP = 1 / PP = 1 full tensors with
global layer indices. ``tools/checkpoint/reshard_checkpoint.py`` rewrites a checkpoint for another
TP/PP size with the same code.

Files, ``metadata.json``, atomic writes, the optimizer contract, resharding on a topology change
and errors: docs/architecture.md §7 (the one description of checkpoints).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_alcot import __version__
from megatron_alcot.checkpointing import atomic
from megatron_alcot.checkpointing.metadata import (FORMAT_VERSION, LATEST_FILE, METADATA_FILE,
                                                   CheckpointError, config_diff, iteration_dir,
                                                   latest_iteration, list_iterations, model_file,
                                                   model_section, optim_file, read_metadata,
                                                   resolve_iteration_dir, state_file,
                                                   write_metadata_text)
from megatron_alcot.checkpointing.reshard import (ShardReader, fit_vocab, global_shape,
                                                  is_vocab_tensor, layer_index, merged_tensor,
                                                  partition_info, shard_tensor, to_global_name)
from megatron_alcot.model.llama import LlamaModel
from megatron_alcot.parallel import parallel_state

logger = logging.getLogger(__name__)
TIED_SOURCE = "embedding.word_embeddings.weight"

__all__ = ["save_checkpoint", "load_checkpoint", "load_full_state_dict", "latest_iteration",
           "list_iterations", "CheckpointError"]


# --- topology helpers -------------------------------------------------------------------------
def _coords() -> dict:
    return {"tp": parallel_state.get_tensor_model_parallel_rank(),
            "pp": parallel_state.get_pipeline_model_parallel_rank(),
            "dp": parallel_state.get_data_parallel_rank(),
            "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pp_size": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp_size": parallel_state.get_data_parallel_world_size()}


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _layer_offset(model: torch.nn.Module, c: dict) -> int:
    """What to add to this stage's ``decoder.layers.{i}`` indices to make them global.

    0 when its names are global already (``LlamaModel`` names its layers by global index, and a
    module whose first index is not 0 does too); else an even split over stages.
    """
    if c["pp_size"] == 1 or isinstance(model, LlamaModel):
        return 0
    local = {layer_index(n) for n, _ in model.named_parameters()} - {None}
    if not local or min(local) > 0:
        return 0
    return c["pp"] * len(local)


def _model_tensors(model: torch.nn.Module, offset: int) -> dict:
    """``{global name: tensor (parameter or buffer, with its TP attributes)}``."""
    return {to_global_name(n, offset): t for n, t in model.state_dict(keep_vars=True).items()}


def _tensor_entry(t: torch.Tensor, tp_size: int, pp_rank: int, name: str) -> dict:
    pdim, stride = partition_info(t)
    return {"global_shape": global_shape(t.shape, pdim, tp_size), "partition_dim": pdim,
            "partition_stride": stride, "dtype": str(t.dtype).replace("torch.", ""),
            "pp_rank": pp_rank, "vocab": is_vocab_tensor(name)}


# --- RNG --------------------------------------------------------------------------------------
def _tracker():
    from megatron_alcot.parallel.tensor_parallel.random import get_rng_tracker
    return get_rng_tracker()


def capture_rng_state() -> dict:
    """Python, numpy, torch CPU, CUDA (if present) and TP-tracker states as weights_only-safe data."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": _tracker().get_states(),
    }


def restore_rng_state(rng: dict) -> None:
    py = rng["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = rng["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        if len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            logger.warning("checkpoint has CUDA RNG states for %d devices, this process sees %d; "
                           "CUDA RNG not restored", len(rng["cuda"]), torch.cuda.device_count())
    _tracker().set_states(rng["tracker"])


# --- optimizer state by parameter name --------------------------------------------------------
def _optimizer_payload(optimizer, names_by_id: dict) -> dict:
    """Per-parameter-name state when the optimizer works on the model's own parameters."""
    sd = optimizer.state_dict()
    groups = getattr(optimizer, "param_groups", None)
    if (not getattr(optimizer, "data_parallel_sharded", False) and groups is not None
            and isinstance(sd, dict) and set(sd) >= {"state", "param_groups"}):
        order = [p for g in groups for p in g["params"]]
        if order and all(id(p) in names_by_id for p in order):
            names = [names_by_id[id(p)] for p in order]
            saved_groups = [dict(g) for g in sd["param_groups"]]
            for g in saved_groups:
                g["params"] = [names[i] for i in g["params"]]
            return {"kind": "per_parameter",
                    "state": {names[i]: s for i, s in sd["state"].items()},
                    "param_groups": saved_groups,
                    "other": {k: v for k, v in sd.items() if k not in ("state", "param_groups")}}
    return {"kind": "opaque", "state_dict": sd}


def _to_torch_optimizer_sd(payload: dict, optimizer, names_by_id: dict, state_for) -> dict:
    """Rebuild a torch optimizer state dict in the current parameter order.

    ``state_for(name)`` returns that parameter's state dict (already cut for this rank) or None.
    """
    groups = optimizer.param_groups
    saved_groups = payload["param_groups"]
    if len(saved_groups) != len(groups):
        raise CheckpointError(f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, "
                              f"this one {len(groups)}; pass load_optim=False (--no-load-optim)")
    out_groups, out_state, index = [], {}, 0
    for saved, group in zip(saved_groups, groups):
        ids = []
        for p in group["params"]:
            name = names_by_id[id(p)]
            s = state_for(name)
            if s is not None:
                out_state[index] = s
            ids.append(index)
            index += 1
        g = {k: v for k, v in saved.items() if k != "params"}
        g["params"] = ids
        out_groups.append(g)
    sd = {"state": out_state, "param_groups": out_groups}
    sd.update(payload.get("other", {}))
    return sd


# --- save -------------------------------------------------------------------------------------
def save_checkpoint(save_dir: str, iteration: int, model, optimizer=None, scheduler=None, *,
                    consumed_samples: int, config_dict: dict, data_config_hash: Optional[str] = None,
                    extra: Optional[dict] = None, engine_state: Optional[Callable[[str], dict]] = None,
                    full_params: Optional[Callable] = None) -> str:
    """Write ``save_dir/iter_{iteration:07d}`` atomically (collective); returns its path.

    For a training engine with its own state format (DeepSpeed): ``engine_state(tmp_dir) ->
    json-able dict`` is called on every rank to write that state into the same directory (rank 0's
    dict becomes the metadata's ``engine`` section), and ``full_params()`` is a context manager
    in which the model's parameters hold their full values (ZeRO-3) while the model files are
    written. ``model`` is the model itself, not a data-parallel wrapper."""
    c = _coords()
    rank = dist.get_rank() if _dist_on() else 0
    final = iteration_dir(save_dir, iteration)
    tmp = final + atomic.TMP_SUFFIX
    try:
        json.dumps({"config": config_dict, "extra": extra})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config_dict and extra must be JSON-serialisable for {final}/"
                              f"{METADATA_FILE}: {e}") from None
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        for path in atomic.remove_stale_temporaries(save_dir):
            logger.info("removed leftover of an interrupted save: %s", path)
        os.makedirs(tmp)
    _barrier()

    engine = engine_state(tmp) if engine_state is not None else None
    offset = _layer_offset(model, c)
    files = {}

    def save_to(name, obj):
        files[name] = atomic.write_file_synced(os.path.join(tmp, name),
                                               lambda f: torch.save(obj, f))

    with (full_params() if full_params is not None else contextlib.nullcontext()):
        tensors = _model_tensors(model, offset)
        entries = {n: _tensor_entry(t, c["tp_size"], c["pp"], n) for n, t in tensors.items()}
        if c["dp"] == 0:
            save_to(model_file(c["tp"], c["pp"]),
                    {"model": {n: t.detach().cpu() for n, t in tensors.items()},
                     "iteration": iteration})
    optim_kind, dp_sharded = None, False
    if optimizer is not None:
        names_by_id = {id(t): n for n, t in tensors.items()}
        payload = _optimizer_payload(optimizer, names_by_id)
        optim_kind = payload["kind"]
        dp_sharded = bool(getattr(optimizer, "data_parallel_sharded", False))
        if dp_sharded or c["dp"] == 0:
            save_to(optim_file(c["tp"], c["pp"], c["dp"]), {"optimizer": payload})
    save_to(state_file(c["tp"], c["pp"], c["dp"]),
            {"rng": capture_rng_state(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None})

    mine = {"coords": c, "entries": entries if c["dp"] == 0 else {}, "files": files}
    if _dist_on():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    if rank == 0:
        meta = _build_metadata(gathered, c, iteration, consumed_samples, config_dict,
                               data_config_hash, extra, optim_kind, dp_sharded)
        if engine is not None:
            meta["engine"] = engine
        text = write_metadata_text(meta)
        atomic.write_file_synced(os.path.join(tmp, METADATA_FILE), lambda f: f.write(text.encode()))
        atomic.commit_directory(tmp, final)
        atomic.replace_text(os.path.join(save_dir, LATEST_FILE), str(iteration))
    _barrier()
    return final


def _build_metadata(gathered, c, iteration, consumed_samples, config_dict, data_config_hash, extra,
                    optim_kind, dp_sharded) -> dict:
    tensors, files = {}, {}
    for item in sorted(gathered, key=lambda g: (g["coords"]["pp"], g["coords"]["tp"])):
        files.update(item["files"])
        if item["coords"]["tp"] != 0:
            continue
        for name, entry in item["entries"].items():
            tensors.setdefault(name, entry)   # tied copies: the first stage holding it wins
    padded = next((tensors[n]["global_shape"][0] for n in tensors if tensors[n]["vocab"]), None)
    true_size = model_section(config_dict).get("vocab_size", padded)
    return {
        "format_version": FORMAT_VERSION, "framework_version": __version__,
        "iteration": int(iteration), "consumed_samples": int(consumed_samples),
        "data_config_hash": data_config_hash, "config": config_dict, "extra": extra,
        "topology": {"tp": c["tp_size"], "pp": c["pp_size"], "dp": c["dp_size"],
                     "world": len(gathered)},
        "vocab": {"true_size": true_size, "padded_size": padded},
        "optimizer": {"kind": optim_kind, "dp_sharded": dp_sharded},
        "rng": {"files": "state_tp{tp:02d}_pp{pp:03d}_dp{dp:03d}.pt (every rank)"},
        "tensors": tensors, "files": files,
    }


# --- load -------------------------------------------------------------------------------------
def load_checkpoint(load_dir: str, model, optimizer=None, scheduler=None, *,
                    iteration: Optional[int] = None, strict: bool = True, load_optim: bool = True,
                    load_rng: bool = True, config_dict: Optional[dict] = None,
                    load_model: bool = True) -> dict:
    """Restore model (and optimizer, scheduler, RNG) from ``load_dir``; see the module docstring.

    ``load_model=False`` leaves the weights to the caller (an engine that restores its own state).

    ``config_dict`` (optional, the same shape as at save time) is compared with the saved config's
    shape fields first, so a wrong ``--num-layers`` reads as a config diff rather than a tensor
    shape error.
    """
    iteration, path = resolve_iteration_dir(load_dir, iteration)
    meta = read_metadata(path)
    if config_dict is not None:
        diff = config_diff(meta.get("config") or {}, config_dict)
        if diff:
            raise CheckpointError(f"checkpoint {path} was saved with another model shape:\n"
                                  + "\n".join(diff) + "\nfix the flags to match the checkpoint, "
                                  "or convert the checkpoint")
    c = _coords()
    saved = meta["topology"]
    resharded = (saved["tp"], saved["pp"]) != (c["tp_size"], c["pp_size"])
    reader = ShardReader(path, meta)
    offset = _layer_offset(model, c)
    tensors = _model_tensors(model, offset)
    missing, unexpected = [], []
    if load_model:
        missing, unexpected = _load_model(reader, meta, tensors, c, resharded, strict, path)
    if optimizer is not None and load_optim:
        _load_optimizer(reader, meta, optimizer, tensors, c, resharded, path)
    own_state = state_file(c["tp"], c["pp"], c["dp"])
    state_name = own_state if own_state in meta["files"] else state_file(0, 0, 0)
    rank_state = reader.load(state_name)
    if scheduler is not None and load_optim:
        if rank_state.get("scheduler") is None:
            raise CheckpointError(f"{path} has no scheduler state; pass load_optim=False "
                                  "(--no-load-optim) to start a fresh schedule")
        scheduler.load_state_dict(rank_state["scheduler"])
    rng_restored = False
    if load_rng:
        same = (saved["tp"], saved["pp"], saved["dp"]) == (c["tp_size"], c["pp_size"], c["dp_size"])
        if same and rank_state.get("rng") is not None:
            restore_rng_state(rank_state["rng"])
            rng_restored = True
        else:
            logger.warning("%s: saved at topology %s, loading at tp %d, pp %d, dp %d: RNG states "
                           "are restored only into the same topology; keeping the current ones",
                           path, saved, c["tp_size"], c["pp_size"], c["dp_size"])
    _barrier()
    return {"iteration": iteration, "consumed_samples": meta["consumed_samples"],
            "config": meta.get("config"), "data_config_hash": meta.get("data_config_hash"),
            "extra": meta.get("extra"), "path": path, "resharded": resharded,
            "rng_restored": rng_restored, "missing_keys": missing, "unexpected_keys": unexpected,
            "metadata": meta}


def _target_for(meta: dict, name: str, local: torch.Tensor, c: dict, get_shard) -> torch.Tensor:
    """This rank's piece of saved tensor ``name``, resharded to ``local``'s layout."""
    full = merged_tensor(meta, name, get_shard)
    pdim, stride = partition_info(local)
    if meta["tensors"][name]["vocab"]:
        rows = local.shape[0] * (c["tp_size"] if pdim == 0 else 1)
        full = fit_vocab(full, meta["vocab"]["true_size"], rows)
    if pdim >= 0 and c["tp_size"] > 1:
        return shard_tensor(full, pdim, stride, c["tp"], c["tp_size"])
    return full


def _saved_name(name: str, tensor: torch.Tensor, saved_names) -> Optional[str]:
    """The checkpoint tensor that feeds ``name``: itself, or for a pipeline stage's tied copy of
    the embedding (``output_layer.weight`` with ``shared_embedding``) the saved embedding."""
    if name in saved_names:
        return name
    if getattr(tensor, "shared_embedding", False) and TIED_SOURCE in saved_names:
        return TIED_SOURCE
    return None


def _load_model(reader, meta, tensors, c, resharded, strict, path):
    saved_names = set(meta["tensors"])
    names = {n: (_saved_name(n, t, saved_names) if resharded else
                 (n if n in saved_names else None)) for n, t in tensors.items()}
    missing = sorted(n for n, src in names.items() if src is None)
    if resharded:
        unexpected = []       # other stages' tensors are expected to be there
    else:
        own = reader.model(c["tp"], c["pp"])
        unexpected = sorted(n for n in own if n not in tensors)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing in checkpoint {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected in checkpoint {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}. Check --latent-method / "
            "--untie-embeddings-and-output-weights / --num-layers, or load with strict=False")
    sources, bad = {}, []
    for n, t in tensors.items():
        src = names[n]
        if src is None:
            continue
        try:
            if resharded:
                value = _target_for(meta, src, t, c, lambda tp, pp, s=src: reader.model(tp, pp)[s])
            else:
                value = own[src]
        except (ValueError, RuntimeError) as e:
            value, why = None, f" ({e})"
        else:
            why = ""
        if value is None or tuple(value.shape) != tuple(t.shape):
            pdim, _ = partition_info(t)
            bad.append(f"  {n}: checkpoint global {meta['tensors'][src]['global_shape']}, "
                       f"model global {global_shape(t.shape, pdim, c['tp_size'])}{why}")
        else:
            sources[n] = value
    if bad:
        raise CheckpointError(f"checkpoint {path} has tensors of other shapes than the model:\n"
                              + "\n".join(bad[:16]) + "\nthe model flags (--hidden-size, "
                              "--num-attention-heads, --ffn-hidden-size, ...) must match the "
                              f"checkpoint's config (see {os.path.join(path, METADATA_FILE)})")
    with torch.no_grad():
        for n, value in sources.items():
            tensors[n].copy_(value)
    return missing, unexpected


def _load_optimizer(reader, meta, optimizer, tensors, c, resharded, path):
    info = meta["optimizer"]
    no_optim = "pass load_optim=False (--no-load-optim) to load the weights with a fresh optimizer"
    if info["kind"] is None:
        engine = (meta.get("engine") or {}).get("name")
        if engine:
            raise CheckpointError(f"{path} holds its optimizer state in {engine}'s format "
                                  f"({meta['engine'].get('dir')}/): resume it with the same "
                                  f"--{engine}-config, or {no_optim}")
        raise CheckpointError(f"{path} holds no optimizer state; {no_optim}")
    names_by_id = {id(t): n for n, t in tensors.items()}
    own_dp = c["dp"] if info["dp_sharded"] else 0
    if info["kind"] == "opaque" or info["dp_sharded"]:
        if resharded or (info["dp_sharded"] and c["dp_size"] != meta["topology"]["dp"]):
            raise CheckpointError(
                f"{path}: the optimizer state ({'DP-sharded' if info['dp_sharded'] else 'opaque'}) "
                f"was saved at topology {meta['topology']} and cannot be resharded to tp "
                f"{c['tp_size']}, pp {c['pp_size']}, dp {c['dp_size']}; {no_optim}")
        payload = reader.optim(c["tp"], c["pp"], own_dp)
        if payload["kind"] == "opaque":
            optimizer.load_state_dict(payload["state_dict"])
            return
    if resharded:
        head = reader.optim(0, 0)   # param groups and hyper-parameters from the first stage
        groups = _merged_param_groups(reader, meta)
        payload = {"param_groups": groups, "other": head.get("other", {})}

        def state_for(local_name):
            name = _saved_name(local_name, tensors[local_name], set(meta["tensors"]))
            if name is None:
                return None
            sinfo = meta["tensors"][name]
            first = reader.optim(0, sinfo["pp_rank"])["state"].get(name)
            if first is None:
                return None
            local = tensors[name]
            saved_local = list(sinfo["global_shape"])
            if sinfo["partition_dim"] >= 0:
                saved_local[sinfo["partition_dim"]] //= meta["topology"]["tp"]
            out = {}
            for key, value in first.items():
                if not torch.is_tensor(value) or list(value.shape) != saved_local:
                    out[key] = value
                    continue
                full = merged_tensor(meta, name, lambda tp, pp: reader.optim(tp, pp)["state"][name][key],
                                     param_shape_local=saved_local)
                pdim, stride = partition_info(local)
                if sinfo["vocab"]:
                    rows = local.shape[0] * (c["tp_size"] if pdim == 0 else 1)
                    full = fit_vocab(full, meta["vocab"]["true_size"], rows)
                if pdim >= 0 and c["tp_size"] > 1:
                    full = shard_tensor(full, pdim, stride, c["tp"], c["tp_size"])
                out[key] = full
            return out

    else:
        payload = reader.optim(c["tp"], c["pp"], own_dp)
        saved_state = payload["state"]

        def state_for(name):
            return saved_state.get(name)
    optimizer.load_state_dict(_to_torch_optimizer_sd(payload, optimizer, names_by_id, state_for))


def _merged_param_groups(reader, meta) -> list:
    """Param groups of all saved stages, group by group (names are global, so they union)."""
    groups = None
    for pp in range(meta["topology"]["pp"]):
        stage = reader.optim(0, pp)["param_groups"]
        if groups is None:
            groups = [dict(g, params=list(g["params"])) for g in stage]
        else:
            for g, s in zip(groups, stage):
                g["params"] += [p for p in s["params"] if p not in g["params"]]
    return groups


# --- offline: full state dict -------------------------------------------------------------------
def load_full_state_dict(load_dir: str, iteration: Optional[int] = None, *,
                         strip_vocab_padding: bool = True) -> tuple:
    """``(full_state_dict, metadata)``: every tensor merged to TP = 1 / PP = 1 (global names).

        sd, meta = load_full_state_dict("ckpts")          # vocab rows cut to the true size
        sd["embedding.word_embeddings.weight"].shape       # [meta["vocab"]["true_size"], hidden]
    """
    _, path = resolve_iteration_dir(load_dir, iteration)
    meta = read_metadata(path)
    reader = ShardReader(path, meta)
    out = {}
    for name, info in meta["tensors"].items():
        full = merged_tensor(meta, name, lambda tp, pp: reader.model(tp, pp)[name])
        if info["vocab"] and strip_vocab_padding:
            full = full.narrow(0, 0, meta["vocab"]["true_size"])
        out[name] = full.clone()
    if model_section(meta.get("config") or {}).get("untie_embeddings_and_output_weights") is False:
        out.pop("output_layer.weight", None)    # a pipeline stage's copy of the tied embedding
    return out, meta
