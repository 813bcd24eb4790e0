"""AdamW with fp32 master weights, Adam state and (optionally) gradients sharded over data parallel.

    >>> opt = build_distributed_optimizer(model, optim_cfg, train_cfg, zero_stage=1)
    >>> model = opt.wrap_model(model)        # stands where DistributedDataParallel would
    >>> model.zero_grad_buffer()             # = opt.zero_grad()
    >>> model(**batch).loss.backward()       # micro-batches accumulate locally, no communication
    >>> model.finish_grad_sync()             # = opt.reduce_gradients() (step() calls it if needed)
    >>> result = opt.step()                  # StepResult(updated, grad_norm, found_inf)

Layout: the parameters of this rank (one TP rank of one PP stage; TP shards are separate tensors,
so only DP is sharded here) live in one flat buffer, decay group first, padded to a multiple of
DP. Data-parallel rank ``r`` owns ``[r·S, (r+1)·S)``. Gradients accumulate in a flat fp32 buffer
of the same layout (fp32 parameters: ``.grad`` is a view into it; bf16/fp16 parameters: a hook adds
each new ``.grad`` into it). ``reduce_gradients`` divides by DP and reduce-scatters the buffer in
place, so each rank then holds the summed gradient of its own range. ``step`` unscales, takes the
global norm (sum of squares over the owned range, all-reduced over DP and then over TP × PP, with
TP-replicated parameters counted on TP rank 0 only and the last stage's tied-embedding copy left
out, as ``clip_grads.get_grad_norm`` does), clips,
runs ``torch.optim.AdamW`` on the owned range and all-gathers the updated parameters in place.

Master weights: with fp32 parameters the owned range of the parameter buffer *is* the master
copy (no second copy); with bf16/fp16 parameters an fp32 copy of the owned range is kept.
``zero_stage=1`` keeps the full gradient buffer between steps; ``zero_stage=2`` copies the owned
range out after the reduction and frees the full buffer until the next ``zero_grad``, so outside
forward/backward a rank holds only 1/DP of the gradients.

Checkpoints: ``state_dict()`` is this rank's shard plus the layout (names, shapes, offsets, shard
range); it loads into the same DP size. ``gather_full_state_dict()`` (collective over DP; returns
on DP rank 0) and ``merge_shard_state_dicts(shards)`` (offline) give a per-parameter-name state in
the checkpointing ``per_parameter`` payload format, which ``load_full_state_dict`` loads at any DP.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_alcot.optim.grad_scaler import build_grad_scaler
from megatron_alcot.optim.optimizer import StepResult, param_groups
from megatron_alcot.parallel import state

STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _reduce_scatter(output: torch.Tensor, input: torch.Tensor, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(output, input, group=group)


def _all_gather(output: torch.Tensor, input: torch.Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, input, group=group)


def _make_inner_adamw(groups: List[dict], betas, eps) -> torch.optim.Optimizer:
    # Same implementation choice as the base optimizer, so the element-wise update is the same.
    try:
        return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, betas=betas, eps=eps, foreach=True)


class DistributedOptimizer:
    """ZeRO-1/2 AdamW over ``named_params`` (see the module docstring)."""

    data_parallel_sharded = True     # checkpointing: every DP rank saves its own shard

    def __init__(self, named_params, *, lr: float, weight_decay: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, clip_grad: float = 0.0, grad_scaler=None, dp_group=None,
                 zero_stage: int = 1, norm_groups: Sequence = ()):
        if zero_stage not in (1, 2):
            raise ValueError(f"zero_stage must be 1 or 2, got {zero_stage}")
        named_params = [(n, p) for n, p in named_params if p.requires_grad]
        if not named_params:
            raise ValueError("DistributedOptimizer got no trainable parameters")
        self.clip_grad, self.grad_scaler, self.zero_stage = clip_grad, grad_scaler, zero_stage
        self.norm_groups = tuple(norm_groups)
        self.dp_group = dp_group if dp_group is not None else state.get_data_parallel_group()
        self.dp_size = dist.get_world_size(self.dp_group) if _dist_on() else 1
        self.dp_rank = dist.get_rank(self.dp_group) if _dist_on() else 0

        name_of = {id(p): n for n, p in named_params}
        base_groups = param_groups(named_params, weight_decay)
        self.params = [p for g in base_groups for p in g["params"]]
        self.names = [name_of[id(p)] for p in self.params]
        dtypes = {p.dtype for p in self.params}
        if any(not d.is_floating_point for d in dtypes):
            raise TypeError(f"DistributedOptimizer needs floating-point parameters, got {sorted(map(str, dtypes))}")
        # One dtype: parameters become views of one flat buffer, all-gathered in their own dtype.
        # Mixed dtypes (e.g. bf16 blocks with an fp32 router): the fp32 master is all-gathered.
        self.param_dtype = dtypes.pop() if len(dtypes) == 1 else None
        self.device = device = self.params[0].device

        # Flat layout: group after group, then padding up to a multiple of DP.
        self.offsets, self.group_ranges, offset = [], [], 0
        for g in base_groups:
            start = offset
            for p in g["params"]:
                self.offsets.append(offset)
                offset += p.numel()
            self.group_ranges.append((start, offset))
        self.numel = offset
        self.shard_size = -(-offset // self.dp_size)
        self.padded_numel = self.shard_size * self.dp_size
        self.shard = (self.dp_rank * self.shard_size, (self.dp_rank + 1) * self.shard_size)

        lo, hi = self.shard
        self._separate_master = self.param_dtype != torch.float32
        self.param_buffer = torch.zeros(self.padded_numel, device=device,
                                        dtype=self.param_dtype or torch.float32)
        with torch.no_grad():
            for p, off in zip(self.params, self.offsets):
                self.param_buffer[off:off + p.numel()].copy_(p.detach().reshape(-1))
                if self.param_dtype is not None:
                    p.data = self.param_buffer[off:off + p.numel()].view_as(p)
        own = self.param_buffer[lo:hi]
        self.master = own.float().clone() if self._separate_master else own
        if self.param_dtype is None:
            self.param_buffer = None

        self.grad_buffer: Optional[torch.Tensor] = None
        self._grad_shard: Optional[torch.Tensor] = None
        self._reduced = False
        self._hooks = []
        for i, p in enumerate(self.params):
            if p.dtype != torch.float32:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(i)))
        self._attach_grad_buffer()

        # One inner parameter per group: the owned part of that group's range (or none).
        self._group_slices, inner_groups = [], []
        for g, (gs, ge) in zip(base_groups, self.group_ranges):
            a, b = max(gs, lo) - lo, min(ge, hi) - lo
            sl = (a, b) if b > a else None
            self._group_slices.append(sl)
            hyper = {k: v for k, v in g.items() if k != "params"}
            inner_groups.append(dict(hyper, lr=lr, params=[self.master[a:b]] if sl else []))
        self.optimizer = _make_inner_adamw(inner_groups, betas, eps)
        self._steps = 0
        # Norm: owned sub-ranges of parameters counted on this TP rank (see clip_grads).
        tp_rank0 = state.get_tensor_model_parallel_rank() == 0
        self._norm_ranges = []
        for p, off in zip(self.params, self.offsets):
            if getattr(p, "shared_embedding", False):
                continue     # the last stage's tied-embedding copy: the first stage counts it
            if getattr(p, "tensor_model_parallel", False) or tp_rank0:
                a, b = max(off, lo), min(off + p.numel(), hi)
                if b > a:
                    self._norm_ranges.append((a - lo, b - lo))
        self._sp_params = [i for i, p in enumerate(self.params) if getattr(p, "sequence_parallel", False)]

    # --- what the trainer, the scheduler and checkpointing see --------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def loss_scale(self) -> float:
        return self.grad_scaler.scale if self.grad_scaler is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.grad_scaler.scale if self.grad_scaler is not None else loss

    def parameters(self) -> List[torch.nn.Parameter]:
        return list(self.params)

    def wrap_model(self, model: torch.nn.Module) -> "ShardedGradModel":
        return ShardedGradModel(model, self)

    def state_bytes(self) -> int:
        """Bytes this rank keeps for the optimizer: Adam moments plus any separate master copy."""
        total = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t))
        if self._separate_master:
            total += self.master.numel() * self.master.element_size()
        return total

    # --- gradients -----------------------------------------------------------------------------
    def _make_hook(self, index: int):
        def hook(param: torch.nn.Parameter) -> None:
            off = self.offsets[index]
            self.grad_buffer[off:off + param.numel()].add_(param.grad.reshape(-1))
            param.grad = None
        return hook

    def _attach_grad_buffer(self) -> None:
        self.grad_buffer = torch.zeros(self.padded_numel, dtype=torch.float32,
                                       device=self.device)
        for p, off in zip(self.params, self.offsets):
            if p.dtype == torch.float32:
                p.grad = self.grad_buffer[off:off + p.numel()].view_as(p)

    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: ARG002 - grads are buffer views
        """Zero the gradient buffer (re-allocating it under ZeRO-2) before the next backward."""
        self._grad_shard, self._reduced = None, False
        if self.grad_buffer is None:
            self._attach_grad_buffer()
        else:
            self.grad_buffer.zero_()
            self._adopt_stray_grads()

    def _adopt_stray_grads(self) -> None:
        # Someone (e.g. module.zero_grad(set_to_none=True)) replaced a buffer view: fold it back.
        for i, p in enumerate(self.params):
            if p.dtype != torch.float32:
                continue
            view = self._grad_view(i)
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                if p.grad is not None:
                    view.add_(p.grad.reshape(-1))
                p.grad = view.view_as(p)

    def _grad_view(self, index: int) -> torch.Tensor:
        off, p = self.offsets[index], self.params[index]
        return self.grad_buffer[off:off + p.numel()]

    def reduce_gradients(self) -> None:
        """Average the accumulated gradients over DP into this rank's range (collective)."""
        if self._reduced:
            return
        if self.grad_buffer is None:
            raise RuntimeError("call zero_grad() before the backward pass (ZeRO-2 frees the gradient "
                               "buffer after each reduction)")
        self._adopt_stray_grads()
        tp_group = state.get_tensor_model_parallel_group()
        if self._sp_params and state.get_tensor_model_parallel_world_size() > 1:
            views = [self._grad_view(i) for i in self._sp_params]
            flat = torch.cat(views)
            dist.all_reduce(flat, group=tp_group)
            offset = 0
            for v in views:
                v.copy_(flat[offset:offset + v.numel()])
                offset += v.numel()
        lo, hi = self.shard
        if self.dp_size > 1:
            self.grad_buffer.div_(self.dp_size)
            _reduce_scatter(self.grad_buffer[lo:hi], self.grad_buffer, self.dp_group)
        if self.zero_stage == 2:
            self._grad_shard = self.grad_buffer[lo:hi].clone()
            for p in self.params:
                p.grad = None
            self.grad_buffer = None
        else:
            self._grad_shard = self.grad_buffer[lo:hi]
        self._reduced = True

    def _grad_norm(self, grad: torch.Tensor) -> float:
        pieces = [grad[a:b] for a, b in self._norm_ranges]
        if pieces:
            total_sq = torch.stack(torch._foreach_norm(pieces)).square().sum()
        else:
            total_sq = torch.zeros((), dtype=torch.float32, device=grad.device)
        if _dist_on():
            groups = [self.dp_group] if self.dp_size > 1 else []
            if state.get_model_parallel_world_size() > 1:
                groups.append(state.get_model_parallel_group())
            groups.extend(g for g in self.norm_groups if g is not None)
            for group in groups:
                dist.all_reduce(total_sq, group=group)
        return float(total_sq.sqrt())

    # --- the step --------------------------------------------------------------------------------
    def step(self) -> StepResult:
        self.reduce_gradients()
        grad = self._grad_shard
        if self.grad_scaler is not None:
            grad.mul_(self.grad_scaler.inv_scale)
        norm = self._grad_norm(grad)
        found_inf = not math.isfinite(norm)
        if self.grad_scaler is not None:
            self.grad_scaler.update(found_inf)
        if found_inf:
            return StepResult(False, norm, True)
        if self.clip_grad > 0:
            coeff = self.clip_grad / (norm + 1e-6)
            if coeff < 1.0:
                grad.mul_(coeff)
        for group, sl in zip(self.optimizer.param_groups, self._group_slices):
            if sl is not None:
                group["params"][0].grad = grad[sl[0]:sl[1]]
        self.optimizer.step()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self._steps += 1
        self._publish_params()
        return StepResult(True, norm, False)

    @torch.no_grad()
    def _publish_params(self) -> None:
        lo, hi = self.shard
        if self.param_buffer is None:
            full = torch.empty(self.padded_numel, dtype=torch.float32, device=self.device)
            full[lo:hi].copy_(self.master)
            if self.dp_size > 1:
                _all_gather(full, full[lo:hi], self.dp_group)
            for p, off in zip(self.params, self.offsets):
                p.copy_(full[off:off + p.numel()].view_as(p))
            return
        own = self.param_buffer[lo:hi]
        if self._separate_master:
            own.copy_(self.master)
        if self.dp_size > 1:
            _all_gather(self.param_buffer, own, self.dp_group)

    # --- checkpoints: this rank's shard ------------------------------------------------------------
    def _layout(self) -> dict:
        return {"names": list(self.names), "shapes": [list(p.shape) for p in self.params],
                "offsets": list(self.offsets), "group_ranges": [list(r) for r in self.group_ranges],
                "numel": self.numel, "padded_numel": self.padded_numel, "shard": list(self.shard)}

    def _flat_state(self, key: str) -> torch.Tensor:
        flat = torch.zeros(self.shard_size, dtype=torch.float32, device=self.master.device)
        for group, sl in zip(self.optimizer.param_groups, self._group_slices):
            if sl is not None:
                s = self.optimizer.state.get(group["params"][0], {})
                if key in s:
                    flat[sl[0]:sl[1]].copy_(s[key])
        return flat

    def _hyper(self) -> List[dict]:
        return [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        shard = {k: self._flat_state(k).cpu() for k in STATE_KEYS}
        if self._separate_master:
            shard["master"] = self.master.detach().cpu().clone()
        return {"kind": "distributed_optimizer", "version": 1, "dp_rank": self.dp_rank,
                "dp_size": self.dp_size, "steps": self._steps, "param_groups": self._hyper(),
                "layout": self._layout(), "shard": shard}

    def _check_layout(self, layout: dict) -> None:
        mine = self._layout()
        for key in ("names", "shapes", "offsets", "numel"):
            if layout[key] != mine[key]:
                raise ValueError(f"optimizer shard layout differs from this model ({key}); the "
                                 "parameters changed, use load_full_state_dict for another DP size")

    def load_state_dict(self, sd: dict) -> None:
        """Load this rank's shard saved at the same DP size (``state_dict`` of the same rank)."""
        if sd.get("kind") != "distributed_optimizer":
            raise ValueError("not a DistributedOptimizer state dict")
        if sd["dp_size"] != self.dp_size or sd["dp_rank"] != self.dp_rank:
            raise ValueError(f"shard of dp rank {sd['dp_rank']}/{sd['dp_size']} cannot load into dp rank "
                             f"{self.dp_rank}/{self.dp_size}; use merge_shard_state_dicts + load_full_state_dict")
        self._check_layout(sd["layout"])
        self._load_flat(sd["param_groups"], sd["steps"],
                        {k: v for k, v in sd["shard"].items()})

    def _load_flat(self, hyper: List[dict], steps: int, flat: dict) -> None:
        # torch numbers parameters by position over all groups; a group empty here takes no index.
        groups, st, index = [], {}, 0
        for h, sl in zip(hyper, self._group_slices):
            groups.append(dict(h, params=[index] if sl is not None else []))
            if sl is not None:
                if steps > 0:
                    st[index] = {"step": torch.tensor(float(steps))}
                    st[index].update({k: flat[k][sl[0]:sl[1]].clone() for k in STATE_KEYS})
                index += 1
        inner_sd = {"state": st, "param_groups": groups}
        self.optimizer.load_state_dict(inner_sd)
        self._steps = int(steps)
        with torch.no_grad():
            if "master" in flat and self._separate_master:
                self.master.copy_(flat["master"])

    # --- checkpoints: the full, DP-independent state ----------------------------------------------
    def gather_full_state_dict(self) -> Optional[dict]:
        """Collective over DP: the per-parameter-name state on DP rank 0, None elsewhere."""
        sd = self.state_dict()
        if self.dp_size == 1:
            return merge_shard_state_dicts([sd])
        gathered = {}
        for key, local in sd["shard"].items():
            local = local.to(self.master.device)
            parts = [torch.empty_like(local) for _ in range(self.dp_size)] if self.dp_rank == 0 else None
            dst = dist.get_global_rank(self.dp_group, 0) if self.dp_group is not None else 0
            dist.gather(local, parts, dst=dst, group=self.dp_group)
            if self.dp_rank == 0:
                gathered[key] = [p.cpu() for p in parts]
        if self.dp_rank != 0:
            return None
        shards = [dict(sd, dp_rank=r, shard={k: v[r] for k, v in gathered.items()})
                  for r in range(self.dp_size)]
        return merge_shard_state_dicts(shards)

    def load_full_state_dict(self, full: dict) -> None:
        """Cut this rank's shard out of a per-parameter-name state (saved at any DP size)."""
        lo, hi = self.shard
        flat = {k: torch.zeros(self.shard_size, dtype=torch.float32) for k in STATE_KEYS}
        masters = full.get("master") or {}
        if masters:
            flat["master"] = self.master.detach().cpu().clone()
        steps = 0
        for name, p, off in zip(self.names, self.params, self.offsets):
            a, b = max(off, lo), min(off + p.numel(), hi)
            if b <= a:
                continue
            s = full["state"].get(name)
            if s is not None:
                steps = int(float(s["step"]))
                for k in STATE_KEYS:
                    flat[k][a - lo:b - lo] = s[k].reshape(-1)[a - off:b - off].float()
            if name in masters:
                flat["master"][a - lo:b - lo] = masters[name].reshape(-1)[a - off:b - off].float()
        saved = full["param_groups"]
        if len(saved) != len(self.optimizer.param_groups):
            raise ValueError(f"saved optimizer has {len(saved)} parameter groups, this one "
                             f"{len(self.optimizer.param_groups)}")
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in saved]
        steps = steps or int(full.get("other", {}).get("steps", 0))
        self._load_flat(hyper, steps, {k: v.to(self.master.device) for k, v in flat.items()})


def merge_shard_state_dicts(shards: Sequence[dict]) -> dict:
    """Per-rank ``state_dict()``s of one DP group (any order) -> per-parameter-name state.

    Returns ``{"kind": "per_parameter", "state": {name: {"step", "exp_avg", "exp_avg_sq"}},
    "param_groups": [{..., "params": [names]}], "other": {"steps": n}}`` plus ``"master": {name:
    fp32 tensor}`` when the parameters were not fp32 (the checkpointing payload format)."""
    shards = sorted(shards, key=lambda s: s["dp_rank"])
    head = shards[0]
    if [s["dp_rank"] for s in shards] != list(range(head["dp_size"])):
        raise ValueError(f"need the shards of all {head['dp_size']} DP ranks, got "
                         f"{[s['dp_rank'] for s in shards]}")
    layout, steps = head["layout"], int(head["steps"])
    flat = {k: torch.cat([s["shard"][k].cpu() for s in shards]) for k in head["shard"]}
    out_state, masters, names_per_group = {}, {}, [[] for _ in layout["group_ranges"]]
    for name, shape, off in zip(layout["names"], layout["shapes"], layout["offsets"]):
        n = math.prod(shape)
        for gi, (gs, ge) in enumerate(layout["group_ranges"]):
            if gs <= off < ge:
                names_per_group[gi].append(name)
        if steps > 0:
            out_state[name] = {"step": torch.tensor(float(steps))}
            out_state[name].update({k: flat[k][off:off + n].view(shape).clone() for k in STATE_KEYS})
        if "master" in flat:
            masters[name] = flat["master"][off:off + n].view(shape).clone()
    groups = [dict(h, params=names) for h, names in zip(head["param_groups"], names_per_group)]
    full = {"kind": "per_parameter", "state": out_state, "param_groups": groups,
            "other": {"steps": steps}}
    if masters:
        full["master"] = masters
    return full


class ShardedGradModel(torch.nn.Module):
    """Stands where ``DistributedDataParallel`` would: forward, ``no_sync``, ``finish_grad_sync``,
    ``zero_grad_buffer``; the gradient reduction is the optimizer's reduce-scatter."""

    def __init__(self, module: torch.nn.Module, optimizer: DistributedOptimizer):
        super().__init__()
        self.module = module
        self._optimizer = [optimizer]     # a list keeps it out of the module tree

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        yield                             # micro-batches always accumulate locally

    def finish_grad_sync(self) -> None:
        self._optimizer[0].reduce_gradients()

    def zero_grad_buffer(self) -> None:
        self._optimizer[0].zero_grad()

    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: ARG002
        self._optimizer[0].zero_grad()


def build_distributed_optimizer(model: torch.nn.Module, optim_cfg, train_cfg=None, *,
                                zero_stage: int = 1, norm_groups: Sequence = ()) -> DistributedOptimizer:
    """``--use-distributed-optimizer``: the base optimizer's groups and hyper-parameters, sharded."""
    return DistributedOptimizer(
        model.named_parameters(), lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
        betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2), eps=optim_cfg.adam_eps,
        clip_grad=optim_cfg.clip_grad,
        grad_scaler=build_grad_scaler(train_cfg) if train_cfg is not None else None,
        zero_stage=zero_stage, norm_groups=norm_groups)
