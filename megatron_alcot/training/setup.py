"""Everything a training run needs before its first iteration, built in a fixed order.

    run = build_run(config, tokenizer, world, on_model_built=None, stream=None)
    run.ctx, run.train_it, run.forward_step       # train_step(run.ctx, run.train_it, run.forward_step)
    run.iteration, run.consumed                   # where --load resumed (0, 0 from scratch)
    run.checkpointer, run.validator, run.logger, run.train_iters, run.gbs

Order (it fixes the random streams, so a resumed run continues the uninterrupted one bit for bit):
seed, model, ``on_model_built(model)``, recompute, ``torch.compile``, the engine (DDP, the
distributed optimizer, or DeepSpeed with ``--deepspeed-config``), scheduler, ``--load``, data
iterators. Call it after ``torch.distributed`` and the process groups are set up.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_alcot import hardware
from megatron_alcot.config import ConfigError
from megatron_alcot.model import build_model
from megatron_alcot.optim import OptimizerParamScheduler, build_optimizer
from megatron_alcot.parallel import device as device_lib
from megatron_alcot.parallel import parallel_state
from megatron_alcot.parallel.tensor_parallel.random import model_parallel_seed
from megatron_alcot.config.run import RunConfig
from megatron_alcot.training.checkpointer import Checkpointer, resume, run_writer
from megatron_alcot.training.compile import apply_torch_compile
from megatron_alcot.training.data_iterators import build_iterators
from megatron_alcot.training.ddp import DistributedDataParallel
from megatron_alcot.training.flops_meter import FlopsMeter
from megatron_alcot.training.logging import TrainLogger
from megatron_alcot.training.recompute import apply_recompute
from megatron_alcot.training.train_step import IterationContext, make_forward_step
from megatron_alcot.training.validator import Validator, validation_pass


@dataclass
class Run:
    config: RunConfig
    device: torch.device
    world: int
    logger: TrainLogger
    model: torch.nn.Module
    ctx: IterationContext
    forward_step: Callable
    train_it: Any
    train_iters: int
    gbs: int
    iteration: int
    consumed: int
    checkpointer: Checkpointer
    validator: Validator


def autocast_dtype(config: RunConfig) -> Optional[torch.dtype]:
    if config.train.bf16:
        return torch.bfloat16
    if config.train.fp16:
        return torch.float16
    return None


def build_run(config: RunConfig, tokenizer, world: int, on_model_built: Optional[Callable] = None,
              stream=None) -> Run:
    t = config.train
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    device = device_lib.get_device()
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    is_rank0 = (dist.get_rank() == 0) if dist.is_initialized() else True
    logger = TrainLogger(config.logging, is_rank0, stream=stream)
    train_iters = t.resolved_train_iters(dp)
    gbs = t.resolved_global_batch(dp)
    num_micro = t.num_micro_batches(dp)
    amp = autocast_dtype(config)

    # Every rank takes rank 0's measured answers for the "auto" flags, so all build the same kernels.
    hardware.share_from_rank0(device)
    hardware.report(config.model, amp, device, emit=logger.print)
    _seed_everything(t.seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    model = _build_model(config).to(device)
    logger.print(f"[model] kernels: {model.spec.describe()}")
    if on_model_built is not None:
        on_model_built(model)
    apply_recompute(model, t.recompute_granularity, t.recompute_method, t.recompute_num_layers)
    if t.torch_compile:
        apply_torch_compile(model)
    ddp, optimizer = _engine(config, model, dp, gbs)
    scheduler = OptimizerParamScheduler.from_config(optimizer, config.optim, train_iters)
    engine = ddp.engine if config.parallel.deepspeed_config is not None else None   # checkpoints its own state

    iteration, consumed = 0, 0
    if t.load is not None:
        iteration, consumed = resume(config, model, optimizer, scheduler, logger.print, engine)
    # Resuming restored the RNG streams of the saved run; gradients stay views into the DDP buffer.
    ddp.zero_grad_buffer()

    train_it, make_valid = build_iterators(config, tokenizer, train_iters, consumed, dp_rank, dp)
    pp = config.parallel.pipeline_model_parallel_size
    reads_data = stage_reads_data(pp)
    if not reads_data:
        train_it = None
    meter = FlopsMeter(config.model, tp=config.parallel.tensor_model_parallel_size)
    forward_step = make_forward_step(config.model, device, amp, meter)
    ctx = IterationContext(model=ddp, optimizer=optimizer, scheduler=scheduler, model_cfg=config.model,
                      num_microbatches=num_micro, device=device, flops_meter=meter,
                      autocast_dtype=amp, pipeline_model_parallel_size=pp,
                      pipeline_schedule=config.parallel.pipeline_schedule,
                      pipeline_max_in_flight=config.parallel.pipeline_max_in_flight,
                      deepspeed=engine is not None)
    validator = Validator(t.eval_iters, t.eval_interval, train_iters, validation_pass(
        ddp, make_valid, eval_iters=t.eval_iters, num_microbatches=num_micro, forward_step=forward_step,
        logger=logger, pp=pp, reads_data=reads_data, autocast_dtype=amp))
    checkpointer = Checkpointer(t.save, t.save_interval,
                                run_writer(config, model, optimizer, scheduler, engine),
                                is_rank0=is_rank0, emit=logger.print)
    logger.print(f"training {train_iters} iterations from iteration {iteration}: global batch {gbs} "
                 f"({num_micro} micro-batches of {t.micro_batch_size} × dp {dp}), world {world}, "
                 f"tp {config.parallel.tensor_model_parallel_size}, pp {pp}, "
                 f"{sum(getattr(p, 'ds_numel', p.numel()) for p in model.parameters()):,} "
                 "parameters on this rank, "
                 f"latent {config.model.latent_method} ℓmax {config.model.max_latent_steps}")
    return Run(config=config, device=device, world=world, logger=logger, model=model, ctx=ctx,
               forward_step=forward_step, train_it=train_it, train_iters=train_iters, gbs=gbs,
               iteration=iteration, consumed=consumed, checkpointer=checkpointer, validator=validator)


def stage_reads_data(pp: int) -> bool:
    """Only the first stage (tokens) and the last (labels, loss mask) read batches."""
    rank = parallel_state.get_pipeline_model_parallel_rank()
    return pp == 1 or rank in (0, pp - 1)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    model_parallel_seed(seed)


def _build_model(config: RunConfig) -> torch.nn.Module:
    if config.parallel.pipeline_model_parallel_size > 1:
        from megatron_alcot.model.pipeline_split import build_pipeline_stage
        return build_pipeline_stage(config.model, config.parallel, seed=config.train.seed)
    return build_model(config.model, config.parallel, seed=config.train.seed)


def _engine(config: RunConfig, model, dp: int, global_batch: int):
    """The model's training wrapper and its optimizer: ``(ddp, optimizer)``."""
    t, par = config.train, config.parallel
    if par.deepspeed_config is not None:
        return _deepspeed_engine(config, model, global_batch)
    if par.use_distributed_optimizer:
        # Built after .to(device): it moves the parameters into its flat, DP-sharded buffers.
        from megatron_alcot.optim.distributed_optimizer import build_distributed_optimizer
        optimizer = build_distributed_optimizer(
            model, config.optim, t, zero_stage=par.zero_stage,
            bucket_size_mb=t.ddp_bucket_size_mb, overlap_grad_reduce=t.overlap_grad_reduce,
            overlap_param_gather=t.overlap_param_gather, grad_reduce_in_bf16=t.grad_reduce_in_bf16)
        return optimizer.wrap_model(model), optimizer
    ddp = DistributedDataParallel(model, parallel_state.get_data_parallel_group(), dp_size=dp,
                                  bucket_size_mb=t.ddp_bucket_size_mb,
                                  overlap_grad_reduce=t.overlap_grad_reduce,
                                  grad_reduce_in_bf16=t.grad_reduce_in_bf16)
    return ddp, build_optimizer(model, config.optim, t)


def _deepspeed_engine(config: RunConfig, model, global_batch: int):
    """``--deepspeed-config``: the DeepSpeed engine around ``model`` with the client AdamW of the
    run's optimizer flags; batch, clipping and bf16 come from the Megatron flags (a config value
    that disagrees is a ConfigError). Returns ``(DeepSpeedModel(engine), optimizer)``."""
    from megatron_alcot.optim.deepspeed_glue import (DeepSpeedModel, build_deepspeed_config,
                                                     initialize_deepspeed)
    o, t = config.optim, config.train
    batch = dict(micro_batch_size=t.micro_batch_size, global_batch_size=global_batch,
                 clip_grad=o.clip_grad, bf16=bool(t.bf16))
    try:
        ds_config = build_deepspeed_config(config.parallel.deepspeed_config, **batch)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"--deepspeed-config {config.parallel.deepspeed_config}: {exc}") from exc
    engine, optimizer = initialize_deepspeed(model, None, ds_config, lr=o.lr, weight_decay=o.weight_decay,
                                             betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, **batch)
    return DeepSpeedModel(engine), optimizer

