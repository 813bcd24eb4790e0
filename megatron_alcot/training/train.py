"""The training loop, callable in-process.

    from megatron_alcot.training.train import train
    history = train(["--num-layers", "2", "--hidden-size", "64", ..., "--train-iters", "20"])
    history.iterations[-1]["loss"], history.evals[-1]["ppl"], history.exit_reason

``train`` does what ``pretrain_alcot.py`` does: parse the flags, validate the whole configuration
(``ConfigError`` naming the flag, before any compute), set up ``torch.distributed`` and the process
groups (unless the caller already did), build model, optimizer, scheduler and data iterators,
resume from ``--load``, then run ``train_step`` until ``--train-iters``, logging every
``--log-interval``, validating every ``--eval-interval`` and at the end, saving every
``--save-interval`` and at the end. It stops early, after saving, on SIGTERM
(``--exit-signal-handler``), ``--exit-duration-in-mins`` or ``--exit-interval``. After
``--max-nan-skips`` consecutive NaN/Inf steps it raises :class:`NanSkipLimitError` without saving
(the last good checkpoint stays as it was).

With ``--deepspeed-config PATH`` the model trains through a DeepSpeed engine
(``optim/deepspeed_glue.py``, ZeRO-1/2/3 over DP, client AdamW from the optimizer flags, our LR
schedule) and ``train_step`` hands the micro-batches to ``engine.backward`` / ``engine.step``;
TP/PP > 1, ``--use-distributed-optimizer`` and ``--fp16`` are refused with it. Its checkpoints are
ours plus the engine's own state in ``deepspeed/`` (weights and ZeRO-partitioned optimizer;
``checkpointing/deepspeed_checkpoint.py``).

``on_model_built(model)`` lets tests reach the model (e.g. to inject a NaN) before training.
"""
from __future__ import annotations

import contextlib
import functools
import random
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_alcot import hardware
from megatron_alcot.arguments import Arguments, parse_args, validate_args, world_size_from_env
from megatron_alcot.checkpointing import checkpoint as ckpt
from megatron_alcot.config import ConfigError
from megatron_alcot.data.tokenizers import build_tokenizer
from megatron_alcot.model import build_model
from megatron_alcot.optim import OptimizerParamScheduler, build_optimizer
from megatron_alcot.parallel import device as device_lib
from megatron_alcot.parallel import parallel_state
from megatron_alcot.parallel.tensor_parallel.random import model_parallel_seed
from megatron_alcot.training.ddp import DistributedDataParallel
from megatron_alcot.training.evaluate import evaluate
from megatron_alcot.training.flops_meter import FlopsMeter
from megatron_alcot.training.logging import TrainLogger, memory_bytes
from megatron_alcot.training.compile import apply_torch_compile
from megatron_alcot.training import signals
from megatron_alcot.training.recompute import apply_recompute
from megatron_alcot.training.timers import Timers
from megatron_alcot.training.train_step import IterationContext, make_forward_step, train_step


class NanSkipLimitError(RuntimeError):
    """Too many consecutive iterations had a NaN/Inf loss or gradient norm."""


@dataclass
class History:
    iterations: List[dict] = field(default_factory=list)  # one record per iteration run here
    evals: List[dict] = field(default_factory=list)
    iteration: int = 0
    consumed_samples: int = 0
    exit_reason: str = "finished"    # finished | signal | duration | interval
    saved_iterations: List[int] = field(default_factory=list)
    config: dict = field(default_factory=dict)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    model_parallel_seed(seed)


def _build_model(args: Arguments) -> torch.nn.Module:
    if args.parallel.pipeline_model_parallel_size > 1:
        from megatron_alcot.model.pipeline_split import build_pipeline_stage
        return build_pipeline_stage(args.model, args.parallel, seed=args.train.seed)
    return build_model(args.model, args.parallel, seed=args.train.seed)


def _autocast_dtype(args: Arguments) -> Optional[torch.dtype]:
    if args.train.bf16:
        return torch.bfloat16
    if args.train.fp16:
        return torch.float16
    return None


def _setup_distributed(args: Arguments) -> bool:
    """Initialise torch.distributed (if the launcher asks for it) and the groups.

    Returns True when this call created the default process group (and so must destroy it)."""
    created = False
    if not (dist.is_available() and dist.is_initialized()) and world_size_from_env() > 1:
        from megatron_alcot.parallel.launch import init_distributed
        init_distributed(backend=args.parallel.distributed_backend,
                         timeout_minutes=args.parallel.distributed_timeout_minutes)
        created = True
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.parallel.pipeline_model_parallel_size)
    return created


def _build_tokenizer(args: Arguments):
    d = args.data
    return build_tokenizer(d.tokenizer_type, tokenizer_model=d.tokenizer_model, vocab_size=d.vocab_size)


def prepare(argv: Optional[Sequence[str]] = None, args: Optional[Arguments] = None):
    """Parse and validate (no compute); returns ``(args, tokenizer, world_size)``."""
    args = args if args is not None else parse_args(argv)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() \
        else world_size_from_env()
    if args.data.tokenizer_type == "NullTokenizer" and not args.data.vocab_size:
        raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size N")
    try:
        tokenizer = _build_tokenizer(args)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--tokenizer-type {args.data.tokenizer_type} / --tokenizer-model: {exc}")
    args.model.vocab_size = tokenizer.vocab_size
    validate_args(args, world)
    return args, tokenizer, world


def train(argv: Optional[Sequence[str]] = None, *, args: Optional[Arguments] = None,
          on_model_built: Optional[Callable] = None, stream=None) -> History:
    args, tokenizer, world = prepare(argv, args)
    start_time = time.time()
    created_pg = _setup_distributed(args)
    try:
        return _run(args, tokenizer, world, start_time, on_model_built, stream)
    finally:
        parallel_state.destroy_model_parallel()
        if created_pg and dist.is_initialized():
            dist.destroy_process_group()


def _run(args, tokenizer, world, start_time, on_model_built, stream) -> History:
    t, lg = args.train, args.logging
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    device = device_lib.get_device()
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    is_rank0 = (dist.get_rank() == 0) if dist.is_initialized() else True
    logger = TrainLogger(lg, is_rank0, stream=stream)
    train_iters = t.resolved_train_iters(dp)
    gbs = t.resolved_global_batch(dp)
    num_micro = t.num_micro_batches(dp)

    # Every rank takes rank 0's measured answers for the "auto" flags, so all build the same kernels.
    hardware.share_from_rank0(device)
    hardware.report(args.model, _autocast_dtype(args), device, emit=logger.print)
    _seed_everything(t.seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    model = _build_model(args).to(device)
    if on_model_built is not None:
        on_model_built(model)
    apply_recompute(model, t.recompute_granularity, t.recompute_method, t.recompute_num_layers)
    if t.torch_compile:
        apply_torch_compile(model)
    if args.parallel.deepspeed_config is not None:
        ddp, optimizer = _deepspeed_engine(args, model, gbs)
    elif args.parallel.use_distributed_optimizer:
        # Built after .to(device): it moves the parameters into its flat, DP-sharded buffers.
        from megatron_alcot.optim.distributed_optimizer import build_distributed_optimizer
        optimizer = build_distributed_optimizer(
            model, args.optim, t, zero_stage=args.parallel.zero_stage,
            bucket_size_mb=t.ddp_bucket_size_mb, overlap_grad_reduce=t.overlap_grad_reduce,
            overlap_param_gather=t.overlap_param_gather, grad_reduce_in_bf16=t.grad_reduce_in_bf16)
        ddp = optimizer.wrap_model(model)
    else:
        ddp = DistributedDataParallel(model, parallel_state.get_data_parallel_group(), dp_size=dp,
                                      bucket_size_mb=t.ddp_bucket_size_mb,
                                      overlap_grad_reduce=t.overlap_grad_reduce,
                                      grad_reduce_in_bf16=t.grad_reduce_in_bf16)
        optimizer = build_optimizer(model, args.optim, t)
    scheduler = OptimizerParamScheduler.from_config(optimizer, args.optim, train_iters)
    engine = ddp.engine if args.parallel.deepspeed_config is not None else None   # checkpoints its own state

    history = History(config=args.to_dict())
    iteration, consumed = 0, 0
    if t.load is not None:
        iteration, consumed = _load(args, model, optimizer, scheduler, logger, engine)
    # Resuming restored the RNG streams of the saved run; gradients stay views into the DDP buffer.
    ddp.zero_grad_buffer()

    train_it, make_valid = _iterators(args, tokenizer, train_iters, consumed, dp_rank, dp)
    pp = args.parallel.pipeline_model_parallel_size
    if not _stage_reads_data(pp):
        train_it = None
    meter = FlopsMeter(args.model, tp=args.parallel.tensor_model_parallel_size)
    autocast_dtype = _autocast_dtype(args)
    forward_step = make_forward_step(args.model, device, autocast_dtype, meter)
    ctx = IterationContext(model=ddp, optimizer=optimizer, scheduler=scheduler, model_cfg=args.model,
                      num_microbatches=num_micro, device=device, flops_meter=meter,
                      autocast_dtype=autocast_dtype, pipeline_model_parallel_size=pp,
                      pipeline_schedule=args.parallel.pipeline_schedule,
                      pipeline_max_in_flight=args.parallel.pipeline_max_in_flight,
                      deepspeed=args.parallel.deepspeed_config is not None)
    run_eval = functools.partial(_evaluate, ddp, make_valid, t, num_micro, forward_step, logger=logger,
                                 pp=pp, autocast_dtype=autocast_dtype)
    logger.print(f"training {train_iters} iterations from iteration {iteration}: global batch {gbs} "
                 f"({num_micro} micro-batches of {t.micro_batch_size} × dp {dp}), world {world}, "
                 f"tp {args.parallel.tensor_model_parallel_size}, pp {pp}, "
                 f"{sum(getattr(p, 'ds_numel', p.numel()) for p in model.parameters()):,} "
                 "parameters on this rank, "
                 f"latent {args.model.latent_method} ℓmax {args.model.max_latent_steps}")

    timers = Timers(sync=device_lib.synchronize)
    window = _Window(args.model.max_latent_steps)
    nan_in_row = 0
    last_saved = None
    signal_ctx = contextlib.nullcontext()
    if t.exit_signal_handler:
        signal_ctx = signals.DistributedSignalHandler(signals.signal_by_name(t.exit_signal))
    with signal_ctx as handler:
        while iteration < train_iters:
            with timers("step"):
                stats = train_step(ctx, train_it, forward_step)
            iteration += 1
            consumed += gbs
            nan_in_row = nan_in_row + 1 if stats.nan_skip else 0
            record = {"iteration": iteration, "consumed_samples": consumed, "loss": stats.loss,
                      "lm_loss": stats.lm_loss, "latent_loss": stats.latent_loss, "lr": stats.lr,
                      "grad_norm": stats.grad_norm, "updated": stats.updated,
                      "nan_skip": stats.nan_skip, "mean_latent_steps": stats.mean_latent_steps,
                      "depth_counts": stats.depth_counts, "loss_scale": stats.loss_scale}
            history.iterations.append(record)
            window.add(stats, timers.elapsed("step"))
            if stats.nan_skip:
                logger.print(f"iteration {iteration}: NaN/Inf loss or gradient norm (loss {stats.loss}, "
                             f"grad norm {stats.grad_norm}); step skipped "
                             f"({nan_in_row} in a row, limit --max-nan-skips {t.max_nan_skips})")
                if nan_in_row >= t.max_nan_skips:
                    logger.close()
                    raise NanSkipLimitError(
                        f"stopping at iteration {iteration}: {nan_in_row} consecutive iterations had a "
                        f"NaN/Inf loss or gradient norm (--max-nan-skips {t.max_nan_skips}); no "
                        "checkpoint was written for them. Lower --lr, raise --clip-grad's strength, "
                        "or resume from the last checkpoint with --load")
            if iteration % lg.log_interval == 0 or iteration == train_iters:
                logger.log_train(window.record(iteration, train_iters, consumed, stats, world, t,
                                               device))
            if t.eval_iters and iteration % t.eval_interval == 0 and iteration < train_iters:
                history.evals.append(run_eval(iteration=iteration))
            if t.save and t.save_interval and iteration % t.save_interval == 0:
                if nan_in_row:
                    # Weights are intact, but a resume from here would silently skip the bad data.
                    logger.print(f"iteration {iteration}: checkpoint postponed during a NaN/Inf streak")
                else:
                    last_saved = _save(args, iteration, model, optimizer, scheduler, consumed, history, engine)
            reason = _exit_reason(t, iteration, start_time, handler)
            if reason is not None:
                history.exit_reason = reason
                if t.save and last_saved != iteration:
                    last_saved = _save(args, iteration, model, optimizer, scheduler, consumed, history, engine)
                if is_rank0 and t.save:      # slurm/_job.sh requeues only after a clean stop
                    signals.write_last_exit(t.save, reason, iteration)
                logger.print(f"exiting at iteration {iteration} ({reason}); checkpoint saved to {t.save}")
                break
    if history.exit_reason == "finished":
        if t.eval_iters and train_iters > 0:
            history.evals.append(run_eval(iteration=iteration))
        if t.save and last_saved != iteration:
            _save(args, iteration, model, optimizer, scheduler, consumed, history, engine)
        if is_rank0 and t.save:
            signals.write_last_exit(t.save, "finished", iteration)
    history.iteration, history.consumed_samples = iteration, consumed
    logger.close()
    return history


def _deepspeed_engine(args, model, global_batch):
    """``--deepspeed-config``: the DeepSpeed engine around ``model`` with the client AdamW of the
    run's optimizer flags; batch, clipping and bf16 come from the Megatron flags (a config value
    that disagrees is a ConfigError). Returns ``(DeepSpeedModel(engine), optimizer)``."""
    from megatron_alcot.optim.deepspeed_glue import (DeepSpeedModel, build_deepspeed_config,
                                                     initialize_deepspeed)
    o, t = args.optim, args.train
    batch = dict(micro_batch_size=t.micro_batch_size, global_batch_size=global_batch,
                 clip_grad=o.clip_grad, bf16=bool(t.bf16))
    try:
        config = build_deepspeed_config(args.parallel.deepspeed_config, **batch)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"--deepspeed-config {args.parallel.deepspeed_config}: {exc}") from exc
    engine, optimizer = initialize_deepspeed(model, None, config, lr=o.lr, weight_decay=o.weight_decay,
                                             betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, **batch)
    return DeepSpeedModel(engine), optimizer


def _iterators(args, tokenizer, train_iters, consumed, dp_rank, dp):
    from megatron_alcot.training.data_iterators import build_iterators
    return build_iterators(args, tokenizer, train_iters, consumed, dp_rank, dp)


def _stage_reads_data(pp: int) -> bool:
    """Only the first stage (tokens) and the last (labels, loss mask) read batches."""
    rank = parallel_state.get_pipeline_model_parallel_rank()
    return pp == 1 or rank in (0, pp - 1)


def _evaluate(ddp, make_valid, t, num_micro, forward_step, *, iteration, logger, pp,
              autocast_dtype) -> dict:
    it = make_valid()
    if it is None:     # no validation split: the same answer on every rank
        return {}
    result = evaluate(ddp, it if _stage_reads_data(pp) else None, eval_iters=t.eval_iters,
                      num_microbatches=num_micro, forward_step=forward_step,
                      pipeline_model_parallel_size=pp, autocast_dtype=autocast_dtype)
    result["iteration"] = iteration
    logger.log_eval(result)
    return result


def _exit_reason(t, iteration, start_time, handler) -> Optional[str]:
    if handler is not None and handler.signals_received():
        return "signal"
    if t.exit_duration_in_mins:
        if signals.any_rank((time.time() - start_time) / 60.0 > t.exit_duration_in_mins):
            return "duration"
    if t.exit_interval and iteration % t.exit_interval == 0:
        return "interval"
    return None


def _save(args, iteration, model, optimizer, scheduler, consumed, history, engine=None) -> int:
    extra, hooks = {}, {}
    if engine is not None:     # DeepSpeed keeps the optimizer state; our files hold the rest
        from megatron_alcot.checkpointing.deepspeed_checkpoint import full_parameters, save_engine_state
        optimizer = None
        hooks = dict(engine_state=lambda tmp: save_engine_state(engine, tmp),
                     full_params=lambda: full_parameters(engine))
    elif optimizer.grad_scaler is not None:
        extra["grad_scaler"] = optimizer.grad_scaler.state_dict()
    ckpt.save_checkpoint(args.train.save, iteration, model, optimizer, scheduler,
                         consumed_samples=consumed, config_dict=args.to_dict(), extra=extra, **hooks)
    history.saved_iterations.append(iteration)
    keep = args.train.keep_last_checkpoints
    if keep and (not dist.is_initialized() or dist.get_rank() == 0):
        from megatron_alcot.checkpointing.retention import prune_checkpoints
        prune_checkpoints(args.train.save, keep)
    return iteration


def _load(args, model, optimizer, scheduler, logger, engine=None):
    t = args.train
    if ckpt.latest_iteration(t.load) is None:
        logger.print(f"--load {t.load}: no checkpoint there yet; training from scratch")
        return 0, 0
    if engine is not None:      # our files: scheduler, RNG; DeepSpeed's: weights and optimizer
        from megatron_alcot.checkpointing.deepspeed_checkpoint import load_engine_state
        fresh = t.finetune or t.no_load_optim
        info = ckpt.load_checkpoint(t.load, model, None, None if fresh else scheduler, load_model=False,
                                    load_optim=not fresh, load_rng=not (t.finetune or t.no_load_rng))
        load_engine_state(engine, info["path"], info["metadata"], load_optim=not fresh)
    else:
        load_optim = not (t.finetune or t.no_load_optim)
        info = ckpt.load_checkpoint(t.load, model, optimizer if load_optim else None,
                                    None if t.finetune else scheduler, load_optim=load_optim,
                                    load_rng=not (t.finetune or t.no_load_rng))
    if t.finetune:
        logger.print(f"--finetune: loaded weights of iteration {info['iteration']} from {t.load}; "
                     "iteration and data restart at 0")
        return 0, 0
    scaler_state = (info.get("extra") or {}).get("grad_scaler")
    if scaler_state and optimizer.grad_scaler is not None:
        optimizer.grad_scaler.load_state_dict(scaler_state)
    logger.print(f"resumed from {info.get('path', t.load)} at iteration {info['iteration']} "
                 f"({info['consumed_samples']} samples consumed)")
    return int(info["iteration"]), int(info["consumed_samples"])


class _Window:
    """Sums over the iterations since the last console line."""

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.reset()

    def reset(self):
        self.seconds = self.tokens = self.flops = 0.0
        self.depth = [0.0] * (self.max_depth + 1)
        self.skipped = 0
        self.n = 0
        self.sums = {"loss": 0.0, "lm_loss": 0.0, "latent_loss": 0.0, "grad_norm": 0.0}
        self.finite = 0

    def add(self, stats, seconds: float):
        self.seconds += seconds
        self.tokens += stats.tokens
        self.flops += stats.flops
        self.depth = [a + b for a, b in zip(self.depth, stats.depth_counts)]
        self.skipped += 0 if stats.updated else 1
        self.n += 1
        if stats.updated:
            self.finite += 1
            for key in self.sums:
                self.sums[key] += getattr(stats, key)

    def record(self, iteration, train_iters, consumed, last, world, t, device) -> dict:
        n = max(self.finite, 1)
        total_depth = sum(self.depth) or 1.0
        tflops = FlopsMeter.tflops_per_device(self.flops, self.seconds, world)
        r = {"iteration": iteration, "train_iters": train_iters, "consumed_samples": consumed,
             "loss": self.sums["loss"] / n if self.finite else last.loss,
             "lm_loss": self.sums["lm_loss"] / n if self.finite else last.lm_loss,
             "latent_loss": self.sums["latent_loss"] / n if self.finite else last.latent_loss,
             "grad_norm": self.sums["grad_norm"] / n if self.finite else last.grad_norm,
             "lr": last.lr, "tokens_per_sec": self.tokens / self.seconds if self.seconds else 0.0,
             "tflops": tflops, "mfu": FlopsMeter.mfu(tflops, t.peak_flops),
             "mean_latent_steps": sum(k * c for k, c in enumerate(self.depth)) / total_depth,
             "depth_share": [c / total_depth for c in self.depth], "skipped": self.skipped,
             "loss_scale": last.loss_scale, "memory_bytes": memory_bytes(device)}
        self.reset()
        return r
