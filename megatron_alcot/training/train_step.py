"""One training iteration: forward-backward over the micro-batches, gradient sync, optimizer step.

    ctx = IterationContext(model=ddp, optimizer=opt, scheduler=sched, model_cfg=cfg, num_microbatches=8,
                      autocast_dtype=torch.bfloat16, device=device, flops_meter=meter)
    stats = train_step(ctx, data_iterator)
    stats.loss, stats.updated, stats.nan_skip, stats.grad_norm, stats.depth_counts

With ``pipeline_model_parallel_size > 1`` the model is this rank's stage and the lap pipeline runs
the micro-batches; the tied embedding's two copies get their summed gradient (before the
data-parallel reduction, which may be ZeRO's reduce-scatter), and the last stage's
statistics reach every stage before the data-parallel reduce, so all ranks report the same numbers.

Statistics of all micro-batches and data-parallel ranks travel in one small all-reduce, so every
rank sees the same mean loss. A non-finite loss or gradient norm skips the update (parameters,
Adam state and LR schedule untouched); ``nan_skip`` says so. Under ``--fp16`` an overflowing
gradient is the loss scaler's business (scale backs off, step skipped) and is not a NaN skip.
With ``--deepspeed-config`` (``ctx.deepspeed``) the model is a DeepSpeed engine
(``optim.deepspeed_glue.DeepSpeedModel``) and :func:`deepspeed_train_step` runs the micro-batches.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron_alcot.optim.grad_sync import GradSyncModel
from megatron_alcot.optim.tied_embedding import allreduce_tied_embedding_grads
from megatron_alcot.parallel import parallel_state
from megatron_alcot.training.pipeline_schedule import infos_from_last_stage, weight_cast_region
from megatron_alcot.training.schedules import get_forward_backward_func


@dataclass
class IterationContext:
    model: GradSyncModel                    # DDP, ZeRO's or DeepSpeed's wrapper (optim.grad_sync)
    optimizer: object                       # optim.MegatronOptimizer
    scheduler: object                       # optim.OptimizerParamScheduler
    model_cfg: object
    num_microbatches: int
    device: torch.device
    flops_meter: object = None
    autocast_dtype: Optional[torch.dtype] = None
    pipeline_model_parallel_size: int = 1
    pipeline_schedule: str = "1f1b"         # --pipeline-schedule
    pipeline_max_in_flight: Optional[int] = None  # --pipeline-max-in-flight
    deepspeed: bool = False                 # model is a DeepSpeed engine (--deepspeed-config)


@dataclass
class IterationStats:
    loss: float
    lm_loss: float
    latent_loss: float
    tokens: int                             # tokens processed in this global batch (all DP ranks)
    flops: float                            # training FLOPs executed (all DP ranks)
    depth_counts: List[float]               # tokens whose ℓ_t == k, k = 0..ℓmax (all DP ranks)
    grad_norm: float = float("nan")
    updated: bool = False
    nan_skip: bool = False
    lr: float = 0.0
    loss_scale: Optional[float] = None

    @property
    def mean_latent_steps(self) -> float:
        total = sum(self.depth_counts)
        return sum(k * c for k, c in enumerate(self.depth_counts)) / total if total else 0.0


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def batch_to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def make_forward_step(model_cfg, device: torch.device, autocast_dtype, flops_meter=None) -> Callable:
    """``forward_step(batch, model) -> (loss, info)`` with detached statistics in ``info``.

    ``info`` stays on the model's device (no host sync per micro-batch) except for the FLOPs
    count, which the meter takes from one host copy of ``num_steps`` (one sync per micro-batch
    with a meter, none without)."""
    max_depth = model_cfg.max_latent_steps

    def forward_step(batch, model):
        batch = batch_to_device(batch, device)
        with autocast_context(device, autocast_dtype):
            out = model(batch["tokens"], labels=batch["labels"], loss_mask=batch.get("loss_mask"),
                        position_ids=batch.get("position_ids"))
        num_steps = out.num_steps if out.num_steps is not None else \
            torch.zeros_like(batch["tokens"])
        depths = torch.arange(max_depth + 1, device=num_steps.device)
        depth = (num_steps.reshape(-1, 1).long() == depths).sum(0)     # bincount would sync
        flops = flops_meter.micro_batch_flops(num_steps.cpu()) if flops_meter is not None else 0.0
        loss = out.loss.detach()
        latent = out.latent_loss if out.latent_loss is not None else loss.new_zeros(())
        info = torch.cat([
            torch.stack([loss.float(), out.lm_loss.detach().float(),
                         latent.detach().float().reshape(())]).double(),
            torch.tensor([1.0, float(batch["tokens"].numel()), float(flops)], dtype=torch.float64,
                         device=loss.device),
            depth.double(),
        ])
        return out.loss, info

    return forward_step


def info_numel(model_cfg) -> int:
    """Length of the ``info`` vector of :func:`make_forward_step`."""
    return 6 + model_cfg.max_latent_steps + 1


def reduce_stats(infos: List[torch.Tensor]) -> torch.Tensor:
    """Sum the per-micro-batch statistics and all-reduce them over the data-parallel group."""
    total = torch.stack(infos).sum(0)
    if dist.is_available() and dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return total


def unpack_stats(total: torch.Tensor) -> IterationStats:
    values = total.tolist()       # one read of the step's statistics
    n = max(values[3], 1.0)
    return IterationStats(loss=values[0] / n, lm_loss=values[1] / n, latent_loss=values[2] / n,
                     tokens=int(values[4]), flops=values[5], depth_counts=values[6:])


def _reduce_on(device: torch.device) -> torch.device:
    # NCCL needs device tensors; gloo takes CPU ones.
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return device
    return torch.device("cpu")


def gather_stage_infos(infos: List[torch.Tensor], model_cfg, device: torch.device,
                       pipeline_model_parallel_size: int = 1) -> List[torch.Tensor]:
    """The infos to reduce over DP, on the reduce device: with PP > 1 the last stage's sum,
    broadcast to every stage (the others ran no step function)."""
    if pipeline_model_parallel_size > 1:
        return infos_from_last_stage(infos, info_numel(model_cfg), device=_reduce_on(device))
    if not infos:
        return []
    return [torch.stack(infos).sum(0).to(_reduce_on(device))]    # one copy per step, not per micro-batch


def deepspeed_train_step(ctx: IterationContext, data_iterator: Iterator,
                         forward_step: Callable) -> IterationStats:
    """The same iteration through a DeepSpeed engine (``ctx.model`` is its ``DeepSpeedModel``):
    ``engine.backward`` divides each micro-batch
    loss by its ``gradient_accumulation_steps`` (= ``num_microbatches``; not divided again here) and
    reduces over DP; ``engine.step()`` updates on the last micro-batch. DeepSpeed skips an update
    with a non-finite gradient norm itself; the LR schedule then does not advance."""
    model = ctx.model
    engine = model.engine
    if engine.gradient_accumulation_steps() != ctx.num_microbatches:
        raise RuntimeError(f"DeepSpeed accumulates {engine.gradient_accumulation_steps()} micro-batches, "
                           f"the trainer runs {ctx.num_microbatches}")
    model.zero_grad_buffer()
    infos = []
    for _ in range(ctx.num_microbatches):
        loss, info = forward_step(next(data_iterator), model)
        engine.backward(loss)
        engine.step()
        infos.append(info)
    model.finish_grad_sync()
    stats = unpack_stats(reduce_stats(gather_stage_infos(infos, ctx.model_cfg, ctx.device)).cpu())
    stats.lr = ctx.optimizer.param_groups[0]["lr"]
    stats.updated = bool(engine.was_step_applied())
    norm = engine.get_global_grad_norm()
    stats.grad_norm = float(norm) if norm is not None else float("nan")
    stats.nan_skip = not stats.updated
    if stats.updated:
        ctx.scheduler.step()
    return stats


def train_step(ctx: IterationContext, data_iterator: Iterator,
               forward_step: Optional[Callable] = None) -> IterationStats:
    model, optimizer = ctx.model, ctx.optimizer
    forward_step = forward_step or make_forward_step(ctx.model_cfg, ctx.device, ctx.autocast_dtype,
                                                     ctx.flops_meter)
    if ctx.deepspeed:
        return deepspeed_train_step(ctx, data_iterator, forward_step)
    model.zero_grad_buffer()
    fb = get_forward_backward_func(ctx.pipeline_model_parallel_size, ctx.autocast_dtype,
                                   ctx.pipeline_schedule, ctx.pipeline_max_in_flight)
    # One autocast weight cache for the whole step: one low-precision copy of each weight, not
    # one per micro-batch (PP = 1) or per lap (PP > 1).
    with weight_cast_region(ctx.device, ctx.autocast_dtype):
        # The lap pipeline drives the stage's laps itself; PP = 1 calls the wrapper's forward.
        infos = fb(forward_step_func=forward_step, data_iterator=data_iterator,
                   model=model.module if ctx.pipeline_model_parallel_size > 1 else model,
                   num_microbatches=ctx.num_microbatches, scale_loss=optimizer.scale_loss,
                   no_sync=model.no_sync)
    # Tied-embedding copies first: the data-parallel reduction may be a sharded reduce-scatter.
    allreduce_tied_embedding_grads(model.module)
    model.finish_grad_sync()
    total = reduce_stats(gather_stage_infos(infos, ctx.model_cfg, ctx.device,
                                            ctx.pipeline_model_parallel_size)).cpu()
    stats = unpack_stats(total)
    stats.lr = optimizer.param_groups[0]["lr"]
    loss_finite = math.isfinite(stats.loss)
    if not loss_finite:
        # Same decision on every rank: the loss was reduced over DP and TP ranks compute it alike.
        if optimizer.grad_scaler is not None:
            optimizer.grad_scaler.update(True)
        stats.updated, stats.nan_skip = False, True
    else:
        result = optimizer.step()
        stats.grad_norm, stats.updated = result.grad_norm, result.updated
        stats.nan_skip = result.found_inf and optimizer.grad_scaler is None
        if result.updated:
            ctx.scheduler.step()
    if optimizer.grad_scaler is not None:
        stats.loss_scale = optimizer.grad_scaler.scale
    return stats
