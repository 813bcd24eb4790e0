"""AdamW with fp32 master weights, Adam state and (optionally) gradients sharded over data parallel.

    >>> opt = build_distributed_optimizer(model, optim_cfg, train_cfg, zero_stage=2)
    >>> model = opt.wrap_model(model)        # stands where DistributedDataParallel would (optim.grad_sync)
    >>> model.zero_grad_buffer()             # = opt.zero_grad()
    >>> model(**batch).loss.backward()       # buckets reduce-scatter as backward fills them
    >>> model.finish_grad_sync()             # = opt.reduce_gradients() (step() calls it if needed)
    >>> result = opt.step()                  # StepResult(updated, grad_norm, found_inf)

Layout (``optim.grad_buffer``, shared with DDP): the parameters of this rank (one TP rank of one PP
stage; TP shards are separate tensors, so only DP is sharded here) sit in one flat layout in
backward order, each on a 64-element boundary, cut into buckets padded to a multiple of 64 × DP.
Data-parallel rank ``r`` owns the ``r``-th 1/DP of every bucket; the owned pieces of parameters
("slices") are the inner AdamW's tensors, so each slice starts on a multiple of 64 elements of its
parameter and the element-wise update takes bitwise the step of the per-parameter AdamW of DDP.

Gradients. ZeRO-1 keeps the full fp32 gradient buffer (fp32 parameters: ``.grad`` is a view into
it); on the last micro-batch each complete bucket is scaled by 1/DP and reduce-scattered
asynchronously while backward continues. ZeRO-2 keeps no full buffer: each new ``.grad`` is added
into a bucket-sized staging tensor and freed; complete buckets are reduce-scattered as backward
produces them and folded into the rank's 1/DP fp32 shard. With PP = 1 it does so on every
micro-batch (the accumulation happens in the shard), so the peak is 1/DP plus the buckets in
flight whatever the number of micro-batches; under PP the lap-cut backward makes several backward
calls per micro-batch and the staging buckets accumulate until ``finish_grad_sync``. Between steps
a ZeRO-2 rank holds no gradient. ``grad_reduce_in_bf16`` sends the buckets in bf16.

``step`` unscales, takes the global norm (sum of squares over the owned slices, all-reduced over
DP and then over TP × PP, with TP-replicated parameters counted on TP rank 0 only and the last
stage's tied-embedding copy left out, as ``clip_grads.get_grad_norm`` does), clips, runs
``torch.optim.AdamW`` on the slices and all-gathers the updated parameters bucket by bucket; with
``overlap_param_gather`` the all-gathers run asynchronously and each module waits for its own
buckets in a forward pre-hook of the next step.

Master weights: with fp32 parameters the owned slices of the parameter buffer *are* the master
copy (no second copy); with bf16/fp16 parameters an fp32 copy of the owned slices is kept.

Checkpoints: ``state_dict()`` is this rank's shard plus the layout (version 2: names, shapes,
offsets, buckets); it loads into the same DP size and layout. ``gather_full_state_dict()``
(collective over DP; returns on DP rank 0) and ``merge_shard_state_dicts(shards)`` (offline, reads
layout versions 1 and 2) give a per-parameter-name state in the checkpointing ``per_parameter``
payload format, which ``load_full_state_dict`` loads at any DP.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_alcot.optim.grad_buffer import ALIGN, BufferLayout, GradBuffer, OwnedSlice, full_from_shards
from megatron_alcot.optim.grad_scaler import build_grad_scaler
from megatron_alcot.optim.grad_sync import GradBufferModel
from megatron_alcot.optim.optimizer import StepResult, param_groups
from megatron_alcot.optim.tied_embedding import tied_embedding_weight
from megatron_alcot.parallel import parallel_state

STATE_KEYS = ("exp_avg", "exp_avg_sq")
LAYOUT_VERSION = 2          # 1: one contiguous range per rank; 2: bucketed, 64-aligned


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_gather(output: torch.Tensor, input: torch.Tensor, group, async_op: bool = False):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor   # torch renamed it
    return fn(output, input, group=group, async_op=async_op)


def _pipeline_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1


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
                 zero_stage: int = 1, norm_groups: Sequence = (), bucket_size_mb: float = 25.0,
                 overlap_grad_reduce: bool = True, overlap_param_gather: bool = False,
                 grad_reduce_in_bf16: bool = False, deferred: Optional[torch.nn.Parameter] = None):
        if zero_stage not in (1, 2):
            raise ValueError(f"zero_stage must be 1 or 2, got {zero_stage}")
        named_params = [(n, p) for n, p in named_params if p.requires_grad]
        if not named_params:
            raise ValueError("DistributedOptimizer got no trainable parameters")
        self.clip_grad, self.grad_scaler, self.zero_stage = clip_grad, grad_scaler, zero_stage
        self.norm_groups = tuple(norm_groups)
        self._join_data_parallel(dp_group)
        base_groups = param_groups(named_params, weight_decay)
        self._order_params(named_params, base_groups)
        self._build_shard_map(bucket_size_mb, deferred)
        self._build_param_buffer()
        self._build_master()
        self.optimizer = self._build_inner_optimizer(base_groups, lr, betas, eps)
        self._steps = 0
        self._build_grad_buffer(overlap_grad_reduce, grad_reduce_in_bf16)
        self._plan_param_gather(overlap_param_gather)
        self._select_norm_slices()

    # --- construction, one step each ----------------------------------------------------------
    def _join_data_parallel(self, dp_group) -> None:
        self.dp_group = dp_group if dp_group is not None else parallel_state.get_data_parallel_group()
        self.dp_size = dist.get_world_size(self.dp_group) if _dist_on() else 1
        self.dp_rank = dist.get_rank(self.dp_group) if _dist_on() else 0

    def _order_params(self, named_params, base_groups: List[dict]) -> None:
        """``params``/``names``/``param_group_index`` in backward order (reverse module order is
        roughly when gradients become ready); ``param_dtype`` is their one dtype, or None."""
        group_of = {id(p): gi for gi, g in enumerate(base_groups) for p in g["params"]}
        self.params = [p for _, p in reversed(named_params)]
        name_of = {id(p): n for n, p in named_params}
        self.names = [name_of[id(p)] for p in self.params]
        self.param_group_index = [group_of[id(p)] for p in self.params]
        dtypes = {p.dtype for p in self.params}
        if any(not d.is_floating_point for d in dtypes):
            raise TypeError(f"DistributedOptimizer needs floating-point parameters, got {sorted(map(str, dtypes))}")
        # One dtype: parameters become views of one flat buffer, all-gathered in their own dtype.
        # Mixed dtypes (e.g. bf16 blocks with an fp32 router): the fp32 master is all-gathered.
        self.param_dtype = dtypes.pop() if len(dtypes) == 1 else None
        self.device = self.params[0].device

    def _build_shard_map(self, bucket_size_mb: float, deferred) -> None:
        """The bucketed layout and the slices of it this DP rank owns (``optim.grad_buffer``)."""
        self.layout = BufferLayout(self.params, dp_size=self.dp_size,
                                   bucket_numel=max(ALIGN, int(bucket_size_mb * 1024 * 1024 / 4)),
                                   deferred=deferred)
        self.slices = self.layout.owned_slices(self.dp_rank)
        self.numel = self.layout.numel

    @torch.no_grad()
    def _build_param_buffer(self) -> None:
        """One dtype: the parameters become views of one flat buffer in the layout's order."""
        self.param_buffer = None
        if self.param_dtype is None:
            return
        self.param_buffer = torch.zeros(self.numel, device=self.device, dtype=self.param_dtype)
        for p, off in zip(self.params, self.layout.offsets):
            self.param_buffer[off:off + p.numel()].copy_(p.detach().reshape(-1))
            p.data = self.param_buffer[off:off + p.numel()].view_as(p)

    @torch.no_grad()
    def _build_master(self) -> None:
        """Non-fp32 parameters: an fp32 copy of the owned slices (fp32: the buffer is the master)."""
        self._separate_master = self.param_dtype != torch.float32
        self.master = None
        if not self._separate_master:
            return
        self.master = torch.zeros(self.layout.shard_numel, dtype=torch.float32, device=self.device)
        for sl in self.slices:
            p = self.params[sl.param_index]
            self.master[sl.shard_lo:sl.shard_lo + sl.hi - sl.lo].copy_(
                p.detach().reshape(-1)[sl.param_lo:sl.param_lo + sl.hi - sl.lo])

    def _build_inner_optimizer(self, base_groups: List[dict], lr: float, betas, eps) -> torch.optim.Optimizer:
        """AdamW over one tensor per owned slice (fp32: a view of the parameter buffer itself, so no
        second copy), each in its parameter's weight-decay group."""
        self._inner = [self._master_view(sl) for sl in self.slices]
        inner_groups = []
        for gi, g in enumerate(base_groups):
            hyper = {k: v for k, v in g.items() if k != "params"}
            members = [t for t, sl in zip(self._inner, self.slices) if self.param_group_index[sl.param_index] == gi]
            inner_groups.append(dict(hyper, lr=lr, params=members))
        return _make_inner_adamw(inner_groups, betas, eps)

    def _build_grad_buffer(self, overlap_grad_reduce: bool, grad_reduce_in_bf16: bool) -> None:
        """The reduce-scatter buckets: ZeRO-1 keeps the full buffer, ZeRO-2 streams into a 1/DP shard."""
        self.grads = GradBuffer(
            self.layout, op="reduce_scatter", dp_group=self.dp_group, dp_rank=self.dp_rank,
            comm_dtype=torch.bfloat16 if grad_reduce_in_bf16 else torch.float32,
            streaming=self.zero_stage == 2, per_round=self.zero_stage == 2 and _pipeline_size() == 1,
            overlap=overlap_grad_reduce)
        self._reduced = False

    def _plan_param_gather(self, overlap_param_gather: bool) -> None:
        """Asynchronous all-gathers of the updated parameters need one flat parameter buffer."""
        self.overlap_param_gather = overlap_param_gather and self.param_buffer is not None and self.dp_size > 1
        self._gathers: dict = {}

    def _select_norm_slices(self) -> None:
        """Owned slices counted in the norm on this rank (see clip_grads), and those of
        sequence-parallel parameters (their gradients are summed over TP too)."""
        tp_rank0 = parallel_state.get_tensor_model_parallel_rank() == 0
        self._norm_slices = [i for i, sl in enumerate(self.slices)
                             if not getattr(self.params[sl.param_index], "shared_embedding", False)
                             and (getattr(self.params[sl.param_index], "tensor_model_parallel", False)
                                  or tp_rank0)]
        self._sp_slices = [i for i, sl in enumerate(self.slices)
                           if getattr(self.params[sl.param_index], "sequence_parallel", False)]

    def _master_view(self, sl: OwnedSlice) -> torch.Tensor:
        if self._separate_master:
            return self.master[sl.shard_lo:sl.shard_lo + sl.hi - sl.lo]
        return self.param_buffer[sl.lo:sl.hi]

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

    def grad_bytes(self) -> int:
        """Bytes of gradient storage this rank holds right now (full buffer, shard, staging)."""
        g = self.grads
        total = sum(t.numel() * t.element_size() for t in (g.data, g.shard) if t is not None)
        total += sum(t.numel() * t.element_size() for t in g._staging.values())
        total += sum(p.grad.numel() * p.grad.element_size() for p in self.params
                     if p.grad is not None and (g.data is None or p.grad.data_ptr() < g.data.data_ptr()
                                                or p.grad.data_ptr() >= g.data.data_ptr() + g.data.numel() * 4))
        return total

    # --- gradients -----------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: ARG002 - grads live in the buffer
        """Start the next accumulation (ZeRO-2: a zeroed 1/DP shard; ZeRO-1: the zeroed buffer)."""
        self._reduced = False
        self.grads.zero()

    def reduce_gradients(self) -> None:
        """Average the accumulated gradients over DP into this rank's slices (collective)."""
        if self._reduced:
            return
        if self.grads.data is None and self.grads.shard is None:
            raise RuntimeError("call zero_grad() before the backward pass (ZeRO-2 frees the gradient "
                               "shard after each step)")
        self.grads.finish()
        if self._sp_slices and parallel_state.get_tensor_model_parallel_world_size() > 1:
            views = [self.grads.reduced(self.slices[i]) for i in self._sp_slices]
            flat = torch.cat(views)
            dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
            offset = 0
            for v in views:
                v.copy_(flat[offset:offset + v.numel()])
                offset += v.numel()
        self._reduced = True

    def _grad_norm(self, grads: List[torch.Tensor]) -> float:
        pieces = [grads[i] for i in self._norm_slices]
        if pieces:
            total_sq = torch.stack(torch._foreach_norm(pieces)).square().sum()
        else:
            total_sq = torch.zeros((), dtype=torch.float32, device=self.device)
        if _dist_on():
            groups = [self.dp_group] if self.dp_size > 1 else []
            if parallel_state.get_model_parallel_world_size() > 1:
                groups.append(parallel_state.get_model_parallel_group())
            groups.extend(g for g in self.norm_groups if g is not None)
            for group in groups:
                dist.all_reduce(total_sq, group=group)
        return float(total_sq.sqrt())

    # --- the step --------------------------------------------------------------------------------
    def step(self) -> StepResult:
        self.reduce_gradients()
        grads = [self.grads.reduced(sl) for sl in self.slices]
        if self.grad_scaler is not None and grads:
            torch._foreach_mul_(grads, self.grad_scaler.inv_scale)
        norm = self._grad_norm(grads)
        found_inf = not math.isfinite(norm)
        if self.grad_scaler is not None:
            self.grad_scaler.update(found_inf)
        if found_inf:
            self._after_step()
            return StepResult(False, norm, True)
        if self.clip_grad > 0 and grads:
            coeff = self.clip_grad / (norm + 1e-6)
            if coeff < 1.0:
                torch._foreach_mul_(grads, coeff)
        for t, g in zip(self._inner, grads):
            t.grad = g
        self.optimizer.step()
        for t in self._inner:
            t.grad = None
        self._steps += 1
        self._after_step()
        self._publish_params()
        return StepResult(True, norm, False)

    def _after_step(self) -> None:
        if self.zero_stage == 2:
            self.grads.release()       # between steps a ZeRO-2 rank holds no gradient at all

    @torch.no_grad()
    def _publish_params(self) -> None:
        """All-gather the updated slices, bucket by bucket (asynchronously with
        ``overlap_param_gather``: each module waits for its buckets in its forward pre-hook)."""
        if self.param_buffer is None:
            self._publish_mixed()
            return
        if self._separate_master:
            for sl, t in zip(self.slices, self._inner):
                self.param_buffer[sl.lo:sl.hi].copy_(t)
        if self.dp_size == 1:
            return
        # Forward order: the last bucket holds the first layers.
        for bucket in reversed(self.layout.buckets):
            lo, hi = self.layout.bucket_shard(bucket, self.dp_rank)
            handle = _all_gather(self.param_buffer[bucket.start:bucket.end], self.param_buffer[lo:hi],
                                 self.dp_group, async_op=self.overlap_param_gather)
            if self.overlap_param_gather:
                self._gathers[bucket.index] = handle

    def wait_param_gather(self, params=None) -> None:
        """Block until the all-gathers holding ``params`` (default: all) are done."""
        if not self._gathers:
            return
        if params is None:
            indices = list(self._gathers)
        else:
            indices = {self.layout.bucket_of(p).index for p in params if id(p) in self.layout._index}
        for i in sorted(indices, reverse=True):
            handle = self._gathers.pop(i, None)
            if handle is not None:
                handle.wait()

    @torch.no_grad()
    def _publish_mixed(self) -> None:
        for bucket in reversed(self.layout.buckets):
            full = torch.zeros(bucket.numel, dtype=torch.float32, device=self.device)
            lo, hi = self.layout.bucket_shard(bucket, self.dp_rank)
            for sl, t in zip(self.slices, self._inner):
                if lo <= sl.lo < hi:
                    full[sl.lo - bucket.start:sl.hi - bucket.start].copy_(t)
            if self.dp_size > 1:
                _all_gather(full, full[lo - bucket.start:hi - bucket.start], self.dp_group)
            for p in bucket.params:
                off = self.layout.offset(p) - bucket.start
                p.copy_(full[off:off + p.numel()].view_as(p))

    # --- checkpoints: this rank's shard ------------------------------------------------------------
    def _layout(self) -> dict:
        return dict(self.layout.describe(), names=list(self.names),
                    shapes=[list(p.shape) for p in self.params], groups=list(self.param_group_index))

    def _flat_state(self, key: str) -> torch.Tensor:
        flat = torch.zeros(self.layout.shard_numel, dtype=torch.float32, device=self.device)
        for t, sl in zip(self._inner, self.slices):
            st = self.optimizer.state.get(t, {})
            if key in st:
                flat[sl.shard_lo:sl.shard_lo + sl.hi - sl.lo].copy_(st[key])
        return flat

    def _hyper(self) -> List[dict]:
        return [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        shard = {k: self._flat_state(k).cpu() for k in STATE_KEYS}
        if self._separate_master:
            shard["master"] = self.master.detach().cpu().clone()
        return {"kind": "distributed_optimizer", "version": LAYOUT_VERSION, "dp_rank": self.dp_rank,
                "dp_size": self.dp_size, "steps": self._steps, "param_groups": self._hyper(),
                "layout": self._layout(), "shard": shard}

    def _check_layout(self, sd: dict) -> None:
        if sd.get("version") != LAYOUT_VERSION:
            raise ValueError(f"optimizer shard has layout version {sd.get('version')}, this optimizer "
                             f"{LAYOUT_VERSION}; load it through merge_shard_state_dicts + "
                             "load_full_state_dict (all DP shards), or resume with --no-load-optim")
        mine, layout = self._layout(), sd["layout"]
        for key in ("names", "shapes", "offsets", "buckets", "numel"):
            if layout[key] != mine[key]:
                raise ValueError(f"optimizer shard layout differs from this model ({key}): the parameters "
                                 "or --ddp-bucket-size-mb changed; use load_full_state_dict")

    def load_state_dict(self, sd: dict) -> None:
        """Load this rank's shard saved at the same DP size (``state_dict`` of the same rank)."""
        if sd.get("kind") != "distributed_optimizer":
            raise ValueError("not a DistributedOptimizer state dict")
        if sd["dp_size"] != self.dp_size or sd["dp_rank"] != self.dp_rank:
            raise ValueError(f"shard of dp rank {sd['dp_rank']}/{sd['dp_size']} cannot load into dp rank "
                             f"{self.dp_rank}/{self.dp_size}; use merge_shard_state_dicts + load_full_state_dict")
        self._check_layout(sd)
        self._load_flat(sd["param_groups"], sd["steps"], {k: v.to(self.device) for k, v in sd["shard"].items()})

    def _load_flat(self, hyper: List[dict], steps: int, flat: dict) -> None:
        # torch numbers parameters by position over all groups.
        slice_of = {id(t): i for i, t in enumerate(self._inner)}
        groups, st, index = [], {}, 0
        for h, g in zip(hyper, self.optimizer.param_groups):
            ids = []
            for t in g["params"]:
                sl = self.slices[slice_of[id(t)]]
                if steps > 0:
                    n = sl.hi - sl.lo
                    st[index] = {"step": torch.tensor(float(steps))}
                    st[index].update({k: flat[k][sl.shard_lo:sl.shard_lo + n].clone() for k in STATE_KEYS})
                ids.append(index)
                index += 1
            groups.append(dict(h, params=ids))
        self.optimizer.load_state_dict({"state": st, "param_groups": groups})
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
            local = local.to(self.device)
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
        """Cut this rank's slices out of a per-parameter-name state (saved at any DP size)."""
        flat = {k: torch.zeros(self.layout.shard_numel, dtype=torch.float32) for k in STATE_KEYS}
        masters = full.get("master") or {}
        if masters and self._separate_master:
            flat["master"] = self.master.detach().cpu().clone()
        steps = 0
        for sl in self.slices:
            name, n = self.names[sl.param_index], sl.hi - sl.lo
            s = full["state"].get(name)
            if s is not None:
                steps = int(float(s["step"]))
                for k in STATE_KEYS:
                    flat[k][sl.shard_lo:sl.shard_lo + n] = s[k].reshape(-1)[sl.param_lo:sl.param_lo + n].float()
            if name in masters and "master" in flat:
                flat["master"][sl.shard_lo:sl.shard_lo + n] = \
                    masters[name].reshape(-1)[sl.param_lo:sl.param_lo + n].float()
        saved = full["param_groups"]
        if len(saved) != len(self.optimizer.param_groups):
            raise ValueError(f"saved optimizer has {len(saved)} parameter groups, this one "
                             f"{len(self.optimizer.param_groups)}")
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in saved]
        steps = steps or int(full.get("other", {}).get("steps", 0))
        self._load_flat(hyper, steps, {k: v.to(self.device) for k, v in flat.items()})


def merge_shard_state_dicts(shards: Sequence[dict]) -> dict:
    """Per-rank ``state_dict()``s of one DP group (any order) -> per-parameter-name state.

    Reads layout version 1 (one contiguous range per rank, parameters in module order) and 2
    (buckets in backward order, 64-element aligned, each rank owning 1/DP of every bucket).
    Returns ``{"kind": "per_parameter", "state": {name: {"step", "exp_avg", "exp_avg_sq"}},
    "param_groups": [{..., "params": [names]}], "other": {"steps": n}}`` plus ``"master": {name:
    fp32 tensor}`` when the parameters were not fp32 (the checkpointing payload format)."""
    shards = sorted(shards, key=lambda s: s["dp_rank"])
    head = shards[0]
    if [s["dp_rank"] for s in shards] != list(range(head["dp_size"])):
        raise ValueError(f"need the shards of all {head['dp_size']} DP ranks, got "
                         f"{[s['dp_rank'] for s in shards]}")
    layout, steps = head["layout"], int(head["steps"])
    if head.get("version", 1) == 1:
        buckets = [[0, layout["padded_numel"]]]
        groups_of = []
        for off in layout["offsets"]:
            groups_of.append(next(gi for gi, (gs, ge) in enumerate(layout["group_ranges"]) if gs <= off < ge))
    else:
        buckets, groups_of = layout["buckets"], layout["groups"]
    flat = {k: full_from_shards(buckets, [s["shard"][k].cpu() for s in shards]) for k in head["shard"]}
    out_state, masters = {}, {}
    names_per_group = [[] for _ in head["param_groups"]]
    for name, shape, off, gi in zip(layout["names"], layout["shapes"], layout["offsets"], groups_of):
        n = math.prod(shape)
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


class ShardedGradModel(GradBufferModel):
    """Stands where ``DistributedDataParallel`` would, with the same interface
    (``optim.grad_sync``) over the optimizer's own gradient buffer: the reduction is its bucketed
    reduce-scatter.

    ZeRO-2 with PP = 1 reduces every micro-batch's gradients (each forward closes the previous
    backward's round), so ``no_sync`` changes nothing there; otherwise it holds the launches back
    until the last micro-batch. With ``overlap_param_gather`` each module waits, in a forward
    pre-hook, for the all-gather of the buckets holding its own parameters."""

    def __init__(self, module: torch.nn.Module, optimizer: DistributedOptimizer):
        super().__init__(module, optimizer.grads)
        self._optimizer = [optimizer]     # a list keeps it out of the module tree
        self._hooks = []
        if optimizer.overlap_param_gather:
            for sub in module.modules():
                own = list(sub.parameters(recurse=False))
                if own:
                    self._hooks.append(sub.register_forward_pre_hook(
                        lambda m, args, own=own: optimizer.wait_param_gather(own)))

    def forward(self, *args, **kwargs):
        self.grads.end_round()
        return self.module(*args, **kwargs)

    def finish_grad_sync(self) -> None:
        self._optimizer[0].reduce_gradients()

    def zero_grad_buffer(self) -> None:
        self._optimizer[0].zero_grad()


def build_distributed_optimizer(model: torch.nn.Module, optim_cfg, train_cfg=None, *,
                                zero_stage: int = 1, norm_groups: Sequence = (),
                                **buffer_options) -> DistributedOptimizer:
    """``--use-distributed-optimizer``: the base optimizer's groups and hyper-parameters, sharded.
    ``buffer_options``: ``bucket_size_mb``, ``overlap_grad_reduce``, ``overlap_param_gather``,
    ``grad_reduce_in_bf16`` (the trainer passes its flags)."""
    return DistributedOptimizer(
        model.named_parameters(), lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
        betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2), eps=optim_cfg.adam_eps,
        clip_grad=optim_cfg.clip_grad,
        grad_scaler=build_grad_scaler(train_cfg) if train_cfg is not None else None,
        zero_stage=zero_stage, norm_groups=norm_groups, deferred=tied_embedding_weight(model),
        **buffer_options)
