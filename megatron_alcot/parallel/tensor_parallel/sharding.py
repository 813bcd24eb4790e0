"""Cut full (TP = 1) tensors into TP shards and glue them back, driven by parameter attributes.

    shard = shard_tensor(full, partition_dim=0, stride=2, rank=1, world_size=2)
    full_again = merge_shards([shard0, shard1], partition_dim=0, stride=2)

``stride`` > 1 means the partitioned dim is ``stride`` blocks that are each split across ranks:
the SwiGLU ``linear_fc1`` weight ``[gate; up]`` has stride 2 and rank r holds ``[gate_r; up_r]``.

State dicts (what checkpoint resharding and the HF converter use)::

    meta = tensor_parallel_meta(model)          # {name: {"partition_dim": d, "stride": s}}
    local_sd = shard_state_dict(full_sd, meta, rank, world)
    full_sd = merge_state_dicts([sd_rank0, sd_rank1], meta)

Names absent from ``meta`` are replicated: sharding keeps them as they are, merging takes rank 0's.

Vocabulary padding depends on the TP size (``ModelConfig.padded_vocab_size(tp)``), so moving a
checkpoint from TP = a to TP = b may need :func:`repad_vocab` on the embedding and output-layer
weights after merging and before re-sharding. New padding rows are zeros, the same as a fresh
init with ``utils.padded_vocab_init``.
"""
from __future__ import annotations

from typing import Dict, List, Mapping

import torch


def _check(full_size: int, stride: int, world_size: int, partition_dim: int):
    if full_size % (stride * world_size):
        raise ValueError(f"dim {partition_dim} of size {full_size} cannot be split into "
                         f"{stride} stride block(s) x {world_size} TP ranks")


def shard_tensor(full: torch.Tensor, partition_dim: int, stride: int, rank: int,
                 world_size: int) -> torch.Tensor:
    """This rank's shard of ``full`` (a contiguous copy)."""
    if world_size == 1:
        return full.clone()
    _check(full.shape[partition_dim], stride, world_size, partition_dim)
    blocks = torch.chunk(full, stride, dim=partition_dim)
    mine = [torch.chunk(b, world_size, dim=partition_dim)[rank] for b in blocks]
    return torch.cat(mine, dim=partition_dim).contiguous()


def merge_shards(shards: List[torch.Tensor], partition_dim: int, stride: int = 1) -> torch.Tensor:
    """Exact inverse of :func:`shard_tensor` over ranks ``0..len(shards)-1``."""
    if len(shards) == 1:
        return shards[0].clone()
    pieces = [torch.chunk(s, stride, dim=partition_dim) for s in shards]
    blocks = [torch.cat([p[b] for p in pieces], dim=partition_dim) for b in range(stride)]
    return torch.cat(blocks, dim=partition_dim)


def tensor_parallel_meta(model: torch.nn.Module) -> Dict[str, dict]:
    """``{param name: {"partition_dim", "stride"}}`` for every TP-sharded parameter (JSON-able)."""
    return {name: {"partition_dim": int(p.partition_dim), "stride": int(p.partition_stride)}
            for name, p in model.named_parameters()
            if getattr(p, "tensor_model_parallel", False)}


def _as_meta(model_or_meta) -> Mapping[str, dict]:
    if isinstance(model_or_meta, torch.nn.Module):
        return tensor_parallel_meta(model_or_meta)
    return model_or_meta


def shard_state_dict(full_sd: Mapping[str, torch.Tensor], model_or_meta, rank: int,
                     world_size: int) -> Dict[str, torch.Tensor]:
    """This TP rank's state dict from a full one; ``model_or_meta`` is a TP model or its meta."""
    meta = _as_meta(model_or_meta)
    out = {}
    for name, t in full_sd.items():
        m = meta.get(name)
        out[name] = (shard_tensor(t, m["partition_dim"], m["stride"], rank, world_size)
                     if m is not None else t)
    return out


def merge_state_dicts(sds: List[Mapping[str, torch.Tensor]], model_or_meta) -> Dict[str, torch.Tensor]:
    """Full state dict from the TP ranks' state dicts (ordered by TP rank)."""
    meta = _as_meta(model_or_meta)
    out = {}
    for name, t in sds[0].items():
        m = meta.get(name)
        out[name] = (merge_shards([sd[name] for sd in sds], m["partition_dim"], m["stride"])
                     if m is not None else t)
    return out


def repad_vocab(tensor: torch.Tensor, new_rows: int, dim: int = 0) -> torch.Tensor:
    """Pad ``tensor`` with zero rows (or drop trailing padding rows) to ``new_rows`` along ``dim``.

    Only padding may be dropped: rows at index >= the true vocabulary size. Callers that shrink
    must make sure ``new_rows`` is at least the true vocabulary size.
    """
    rows = tensor.shape[dim]
    if new_rows <= rows:
        return tensor.narrow(dim, 0, new_rows).clone()
    pad_shape = list(tensor.shape)
    pad_shape[dim] = new_rows - rows
    return torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
