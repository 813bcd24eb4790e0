"""Move checkpoint tensors between TP/PP layouts: merge saved shards, fix vocab padding, re-cut.

    reader = ShardReader("ckpts/iter_0001000", meta)          # lazy, weights_only, size-checked
    full = merged_tensor(meta, "decoder.layers.0.mlp.linear_fc1.weight",
                         lambda tp, pp: reader.model(tp, pp)[name])
    full = fit_vocab(full, meta["vocab"]["true_size"], new_padded_rows)   # vocab tensors only
    local = shard_tensor(full, partition_dim, stride, tp_rank, tp_size)

Names in checkpoints carry global layer indices; :func:`to_global_name` / :func:`to_local_name`
translate a pipeline stage's ``decoder.layers.{i}`` with the stage's layer offset.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Dict, Optional

import torch

from megatron_alcot.checkpointing import atomic
from megatron_alcot.checkpointing.metadata import (LATEST_FILE, METADATA_FILE, VOCAB_TENSORS, CheckpointError,
                                                   check_files, iteration_dir, model_file, model_section,
                                                   optim_file, read_metadata, resolve_iteration_dir,
                                                   state_file, write_metadata_text)
from megatron_alcot.parallel.tensor_parallel.sharding import merge_shards, repad_vocab, shard_tensor

_LAYER_RE = re.compile(r"^((?:.*\.)?decoder\.layers\.)(\d+)(\..*)$")

__all__ = ["ShardReader", "merged_tensor", "fit_vocab", "shard_tensor", "to_global_name",
           "to_local_name", "layer_index", "partition_info", "is_vocab_tensor", "stage_of"]


def layer_index(name: str) -> Optional[int]:
    m = _LAYER_RE.match(name)
    return int(m.group(2)) if m else None


def _shift(name: str, delta: int) -> str:
    m = _LAYER_RE.match(name)
    if not m or delta == 0:
        return name
    return f"{m.group(1)}{int(m.group(2)) + delta}{m.group(3)}"


def to_global_name(name: str, layer_offset: int) -> str:
    """``decoder.layers.1.x`` of a stage whose first layer is global layer 4 -> ``decoder.layers.5.x``."""
    return _shift(name, layer_offset)


def to_local_name(name: str, layer_offset: int) -> str:
    return _shift(name, -layer_offset)


def is_vocab_tensor(name: str) -> bool:
    return name in VOCAB_TENSORS


def partition_info(param: torch.Tensor) -> tuple:
    """``(partition_dim, stride)``; ``(-1, 1)`` for a replicated tensor."""
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim), int(getattr(param, "partition_stride", 1))
    return -1, 1


def global_shape(local_shape, partition_dim: int, tp: int) -> list:
    shape = list(local_shape)
    if partition_dim >= 0:
        shape[partition_dim] *= tp
    return shape


def stage_of(name: str, num_layers: int, pp: int) -> list:
    """Pipeline stages that hold ``name`` under an even layer split (the offline tool's rule).

    Layers go to ``i // (num_layers / pp)``; ``embedding.*`` to the first stage; everything else
    (final norm, output layer, routers) to the last stage.
    """
    idx = layer_index(name)
    if idx is not None:
        return [idx // (num_layers // pp)]
    if name.startswith("embedding."):
        return [0]
    return [pp - 1]


def merged_tensor(meta: dict, name: str, get_shard: Callable[[int, int], torch.Tensor],
                  param_shape_local: Optional[list] = None) -> torch.Tensor:
    """Full (TP = 1) tensor ``name`` from the saved TP shards; ``get_shard(tp, pp)`` reads one.

    For optimizer state pass ``param_shape_local``: a state tensor of another shape than its
    parameter's shard (a scalar ``step``) is replicated and taken from TP rank 0.
    """
    info = meta["tensors"][name]
    pp = info["pp_rank"]
    first = get_shard(0, pp)
    pdim = info["partition_dim"]
    if pdim < 0 or meta["topology"]["tp"] == 1:
        return first
    if param_shape_local is not None and list(first.shape) != list(param_shape_local):
        return first
    shards = [first] + [get_shard(t, pp) for t in range(1, meta["topology"]["tp"])]
    return merge_shards(shards, pdim, info["partition_stride"])


def fit_vocab(full: torch.Tensor, true_size: int, rows: int) -> torch.Tensor:
    """Resize the padded vocabulary dim 0 to ``rows``: keep the saved rows that fit (so padding
    values survive where possible), add zero rows beyond them, never cut below ``true_size``."""
    if rows < true_size:
        raise CheckpointError(f"cannot fit a vocabulary of {true_size} tokens into {rows} rows; "
                              "the model's --vocab-size / tokenizer is smaller than the checkpoint's")
    if full.shape[0] == rows:
        return full
    return repad_vocab(full, rows)


class ShardReader:
    """Reads (and caches) a checkpoint's shard files with ``torch.load(weights_only=True)``."""

    def __init__(self, ckpt_dir: str, meta: dict, mmap: bool = True):
        self.dir, self.meta, self.mmap = ckpt_dir, meta, mmap
        self._cache: Dict[str, dict] = {}

    def load(self, name: str) -> dict:
        if name not in self._cache:
            self._cache[name] = load_file(os.path.join(self.dir, name), self.meta, self.mmap)
        return self._cache[name]

    def model(self, tp: int, pp: int) -> dict:
        return self.load(model_file(tp, pp))["model"]

    def optim(self, tp: int, pp: int, dp: int = 0) -> dict:
        return self.load(optim_file(tp, pp, dp))["optimizer"]


def load_file(path: str, meta: Optional[dict] = None, mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)`` with size check and a clear error when corrupt."""
    ckpt_dir, name = os.path.split(path)
    if meta is not None:
        check_files(ckpt_dir, meta, [name])
    elif not os.path.isfile(path):
        raise CheckpointError(f"shard {path} is missing; load another iteration")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}. The file is corrupt, "
                              "truncated or not a megatron_alcot checkpoint (it must load with "
                              "torch.load(weights_only=True)); load another iteration") from None


# --- offline: rewrite a checkpoint for another TP/PP ---------------------------------------------
def reshard_checkpoint(load_dir: str, save_dir: str, target_tp: int, target_pp: Optional[int] = None,
                       iteration: Optional[int] = None, log=print) -> str:
    """Write ``save_dir/iter_N`` for ``target_tp`` x ``target_pp`` (DP 1; any DP loads it).

        reshard_checkpoint("ckpts", "ckpts_tp1", target_tp=1)        # -> "ckpts_tp1/iter_0001000"

    Model weights and per-parameter optimizer state (Adam moments) are merged and re-cut; the
    scheduler state is kept; RNG states are not carried over (they belong to the old ranks).
    Opaque or DP-sharded optimizer state is dropped: load the result with --no-load-optim.
    Pipeline stages split the layers evenly (``stage_of``).
    """
    iteration, src = resolve_iteration_dir(load_dir, iteration)
    meta = read_metadata(src)
    reader = ShardReader(src, meta)
    layout = _TargetLayout.of(meta, target_tp, target_pp)
    full, meta = _merged_model(meta, reader, layout)
    optim = _merged_optimizer(meta, reader, layout, log)
    sched_state = reader.load(state_file(0, 0, 0)).get("scheduler")

    final = iteration_dir(save_dir, iteration)
    tmp = final + atomic.TMP_SUFFIX
    os.makedirs(save_dir, exist_ok=True)
    atomic.remove_stale_temporaries(save_dir)
    os.makedirs(tmp)
    files, tensors = _write_shards(tmp, iteration, meta, reader, layout, full, optim, sched_state)
    text = write_metadata_text(_resharded_metadata(meta, src, layout, optim, files, tensors))
    atomic.write_file_synced(os.path.join(tmp, METADATA_FILE), lambda f: f.write(text.encode()))
    atomic.commit_directory(tmp, final)
    atomic.replace_text(os.path.join(save_dir, LATEST_FILE), str(iteration))
    return final


class _TargetLayout:
    """The target TP/PP sizes, the layer count and the vocabulary rows at the target TP."""

    def __init__(self, tp: int, pp: int, num_layers: int, true_size: int, rows: Optional[int]):
        self.tp, self.pp, self.num_layers, self.true_size, self.rows = tp, pp, num_layers, true_size, rows

    @classmethod
    def of(cls, meta: dict, target_tp: int, target_pp: Optional[int]) -> "_TargetLayout":
        tp, pp = int(target_tp), int(target_pp or meta["topology"]["pp"])
        cfg = model_section(meta.get("config") or {})
        num_layers = cfg.get("num_layers") or 1 + max(
            (layer_index(n) for n in meta["tensors"] if layer_index(n) is not None), default=0)
        if tp < 1 or pp < 1 or num_layers % pp:
            raise CheckpointError(f"--target-pipeline-parallel-size {pp} must divide the "
                                  f"{num_layers} layers and sizes must be >= 1")
        true_size = meta["vocab"]["true_size"]
        multiple = int(cfg.get("make_vocab_size_divisible_by", 128)) * tp
        rows = -(-true_size // multiple) * multiple if true_size else None
        return cls(tp, pp, num_layers, true_size, rows)

    def fitted(self, meta: dict, name: str, full: torch.Tensor) -> torch.Tensor:
        """``full`` with its vocabulary dim fitted to the target rows (vocabulary tensors only)."""
        if meta["tensors"][name]["vocab"] and self.rows is not None:
            return fit_vocab(full, self.true_size, self.rows)
        return full

    def cut(self, meta: dict, name: str, full: torch.Tensor, tp_rank: int) -> torch.Tensor:
        """TP rank ``tp_rank``'s shard of the full tensor ``name`` (a copy when not split)."""
        info = meta["tensors"][name]
        if info["partition_dim"] >= 0 and self.tp > 1:
            return shard_tensor(full, info["partition_dim"], info["partition_stride"], tp_rank, self.tp)
        return full.clone()


def _merged_model(meta: dict, reader: "ShardReader", layout: _TargetLayout):
    """Every model tensor at full size, and the metadata with the tied output copy added or dropped."""
    full = {n: layout.fitted(meta, n, merged_tensor(meta, n, lambda t, p, n=n: reader.model(t, p)[n]))
            for n in meta["tensors"]}
    meta = dict(meta, tensors=dict(meta["tensors"]))
    if model_section(meta.get("config") or {}).get("untie_embeddings_and_output_weights") is False:
        # Tied embeddings: a last stage other than the first holds a copy as output_layer.weight.
        tied, copy = "embedding.word_embeddings.weight", "output_layer.weight"
        if layout.pp > 1 and tied in full:
            full[copy] = full[tied]
            meta["tensors"][copy] = dict(meta["tensors"][tied])
        else:
            full.pop(copy, None)
    return full, meta


class _MergedOptimizer:
    """Per-parameter optimizer state at full size and the merged param groups; ``carry`` False
    when the saved state cannot be resharded (opaque or DP-sharded)."""

    def __init__(self, carry: bool, state: Optional[dict] = None, groups: Optional[list] = None):
        self.carry, self.state, self.groups = carry, state or {}, groups or []


def _merged_optimizer(meta: dict, reader: "ShardReader", layout: _TargetLayout, log) -> _MergedOptimizer:
    optim = meta["optimizer"]
    carry = optim["kind"] == "per_parameter" and not optim["dp_sharded"]
    if optim["kind"] is not None and not carry:
        log(f"note: the {optim['kind']}{' DP-sharded' if optim['dp_sharded'] else ''} optimizer "
            "state cannot be resharded and is dropped; load the result with --no-load-optim")
    if not carry:
        return _MergedOptimizer(False)
    state = {}
    for name, info in meta["tensors"].items():
        first = reader.optim(0, info["pp_rank"])["state"].get(name)
        if first is None:
            continue
        local = list(info["global_shape"])
        if info["partition_dim"] >= 0:
            local[info["partition_dim"]] //= meta["topology"]["tp"]
        state[name] = {
            k: (layout.fitted(meta, name, merged_tensor(meta, name, lambda t, p, n=name, k=k:
                                                        reader.optim(t, p)["state"][n][k],
                                                        param_shape_local=local))
                if torch.is_tensor(v) and list(v.shape) == local else v)
            for k, v in first.items()}
    groups = [dict(g, params=list(g["params"])) for g in reader.optim(0, 0)["param_groups"]]
    for p in range(1, meta["topology"]["pp"]):
        for g, s in zip(groups, reader.optim(0, p)["param_groups"]):
            g["params"] += [n for n in s["params"] if n not in g["params"]]
    return _MergedOptimizer(True, state, groups)


def _write_shards(tmp: str, iteration: int, meta: dict, reader: "ShardReader", layout: _TargetLayout,
                  full: dict, optim: _MergedOptimizer, sched_state) -> tuple:
    """Model, optimizer and state files of every (tp, pp) rank under ``tmp``; returns
    ``(files, tensors)`` for the metadata: file sizes and each tensor's entry with its new stage."""
    files, tensors = {}, {}

    def save(fname, obj):
        files[fname] = atomic.write_file_synced(os.path.join(tmp, fname), lambda f: torch.save(obj, f))

    for p in range(layout.pp):
        names = [n for n in full if p in stage_of(n, layout.num_layers, layout.pp)]
        for r in range(layout.tp):
            save(model_file(r, p), {"model": {n: layout.cut(meta, n, full[n], r) for n in names},
                                    "iteration": iteration})
            if optim.carry:
                stage_groups = [dict(g, params=[n for n in g["params"] if n in names])
                                for g in optim.groups]
                stage_state = {n: {k: layout.cut(meta, n, v, r) if torch.is_tensor(v) and v.dim() > 0 else v
                                   for k, v in optim.state[n].items()}
                               for n in names if n in optim.state}
                save(optim_file(r, p, 0), {"optimizer": {
                    "kind": "per_parameter", "state": stage_state, "param_groups": stage_groups,
                    "other": reader.optim(0, 0).get("other", {})}})
            save(state_file(r, p, 0), {"rng": None, "scheduler": sched_state})
        for n in names:
            info = dict(meta["tensors"][n], global_shape=list(full[n].shape))
            tensors.setdefault(n, dict(info, pp_rank=p))
    return files, tensors


def _resharded_metadata(meta: dict, src: str, layout: _TargetLayout, optim: _MergedOptimizer,
                        files: dict, tensors: dict) -> dict:
    """The source metadata with the target topology, vocabulary, optimizer kind, files and tensors."""
    tp, pp = layout.tp, layout.pp
    new_meta = dict(meta, topology={"tp": tp, "pp": pp, "dp": 1, "world": tp * pp},
                    vocab={"true_size": layout.true_size,
                           "padded_size": layout.rows or meta["vocab"]["padded_size"]},
                    optimizer={"kind": "per_parameter" if optim.carry else None, "dp_sharded": False},
                    tensors=tensors, files=files,
                    resharded_from={"path": os.path.abspath(src), "topology": meta["topology"]})
    config = new_meta.get("config")
    if isinstance(config, dict) and isinstance(config.get("parallel"), dict):
        config["parallel"] = dict(config["parallel"], tensor_model_parallel_size=tp,
                                  pipeline_model_parallel_size=pp)
    return new_meta
