"""The training loop, callable in-process.

    from megatron_alcot.arguments import parse_args       # or build a RunConfig directly
    from megatron_alcot.training.train import train
    history = train(parse_args(["--num-layers", "2", "--hidden-size", "64", ..., "--train-iters", "20"]))
    history.iterations[-1]["loss"], history.evals[-1]["ppl"], history.exit_reason

``train(config)`` takes a :class:`~megatron_alcot.config.run.RunConfig` (``pretrain_alcot.py``
parses the flags into one). It validates the whole configuration (``ConfigError`` naming the flag,
before any compute), sets up ``torch.distributed`` and the process groups (unless the caller
already did), builds the run (``training/setup.py``: model, engine, optimizer, scheduler, resume
from ``--load``, data), then runs ``train_step`` until ``--train-iters``. After each iteration the
loop asks small policy objects what to do:

- :class:`~megatron_alcot.training.stopping.NanPolicy`: after ``--max-nan-skips`` consecutive
  NaN/Inf iterations it raises :class:`NanSkipLimitError` without saving (the last good checkpoint
  stays as it was);
- :class:`~megatron_alcot.training.log_window.LogWindow`: a console line every ``--log-interval``;
- :class:`~megatron_alcot.training.validator.Validator`: every ``--eval-interval`` and at the end;
- :class:`~megatron_alcot.training.checkpointer.Checkpointer`: every ``--save-interval`` and at
  the end or an early exit, then ``last_exit.json``;
- :class:`~megatron_alcot.training.stopping.ExitPolicy`: stop early, after saving, on a signal
  (``--exit-signal-handler``), ``--exit-duration-in-mins`` or ``--exit-interval``.

With ``--deepspeed-config PATH`` the model trains through a DeepSpeed engine
(``optim/deepspeed_glue.py``, ZeRO-1/2/3 over DP, client AdamW from the optimizer flags, our LR
schedule) and ``train_step`` hands the micro-batches to ``engine.backward`` / ``engine.step``;
TP/PP > 1, ``--use-distributed-optimizer`` and ``--fp16`` are refused with it. Its checkpoints are
ours plus the engine's own state in ``deepspeed/`` (weights and ZeRO-partitioned optimizer;
``checkpointing/deepspeed_checkpoint.py``).

``on_model_built(model)`` lets tests reach the model (e.g. to inject a NaN) before training.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch.distributed as dist

from megatron_alcot.config import ConfigError
from megatron_alcot.data.tokenizers import build_tokenizer
from megatron_alcot.parallel import device as device_lib
from megatron_alcot.parallel import parallel_state
from megatron_alcot.config.run import RunConfig, validate_run
from megatron_alcot.training.log_window import LogWindow
from megatron_alcot.training.setup import Run, build_run
from megatron_alcot.training.stopping import ExitPolicy, NanPolicy, NanSkipLimitError
from megatron_alcot.training.timers import Timers
from megatron_alcot.training.train_step import train_step

__all__ = ["History", "NanSkipLimitError", "prepare", "train"]


@dataclass
class History:
    iterations: List[dict] = field(default_factory=list)  # one record per iteration run here
    evals: List[dict] = field(default_factory=list)
    iteration: int = 0
    consumed_samples: int = 0
    exit_reason: str = "finished"    # finished | signal | duration | interval
    saved_iterations: List[int] = field(default_factory=list)
    config: dict = field(default_factory=dict)


def prepare(config: RunConfig):
    """Build the tokenizer and validate (no compute); returns ``(config, tokenizer, world_size)``."""
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    else:
        from megatron_alcot.parallel.launch import discover
        world = discover().world_size
    d = config.data
    if d.tokenizer_type == "NullTokenizer" and not d.vocab_size:
        raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size N")
    try:
        tokenizer = build_tokenizer(d.tokenizer_type, tokenizer_model=d.tokenizer_model,
                                    vocab_size=d.vocab_size)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--tokenizer-type {d.tokenizer_type} / --tokenizer-model: {exc}")
    config.model.vocab_size = tokenizer.vocab_size
    validate_run(config, world)
    return config, tokenizer, world


def train(config: RunConfig, *, on_model_built: Optional[Callable] = None, stream=None) -> History:
    config, tokenizer, world = prepare(config)
    start_time = time.time()
    created_pg = _setup_distributed(config)
    try:
        return _loop(build_run(config, tokenizer, world, on_model_built, stream), start_time)
    finally:
        parallel_state.destroy_model_parallel()
        if created_pg and dist.is_initialized():
            dist.destroy_process_group()


def _loop(run: Run, start_time: float) -> History:
    t, logger, checkpointer, validator = run.config.train, run.logger, run.checkpointer, run.validator
    history = History(config=run.config.to_dict(), saved_iterations=checkpointer.saved)
    iteration, consumed = run.iteration, run.consumed
    timers = Timers(sync=device_lib.synchronize)
    window = LogWindow(run.config.model.max_latent_steps, run.config.logging.log_interval,
                       run.train_iters, run.world, t.peak_flops, run.device)
    nan = NanPolicy(t.max_nan_skips, emit=logger.print)
    with ExitPolicy.from_config(t, start_time) as exits:
        while iteration < run.train_iters:
            with timers("iteration"):
                stats = train_step(run.ctx, run.train_it, run.forward_step)
            iteration += 1
            consumed += run.gbs
            history.iterations.append(_record(iteration, consumed, stats))
            window.add(stats, timers.elapsed("iteration"))
            try:
                nan.observe(iteration, stats)
            except NanSkipLimitError:
                logger.close()
                raise
            if window.should_log(iteration):
                logger.log_train(window.record(iteration, consumed, stats))
            if validator.should_validate(iteration):
                history.evals.append(validator.validate(iteration))
            checkpointer.save(iteration, consumed, nan_streak=nan.streak)
            reason = exits.reason(iteration)
            if reason is not None:
                history.exit_reason = reason
                checkpointer.finish(iteration, consumed, reason)
                logger.print(f"exiting at iteration {iteration} ({reason}); checkpoint saved to {t.save}")
                break
    if history.exit_reason == "finished":
        if validator.validates_at_end():
            history.evals.append(validator.validate(iteration))
        checkpointer.finish(iteration, consumed, "finished")
    history.iteration, history.consumed_samples = iteration, consumed
    logger.close()
    return history


def _record(iteration: int, consumed: int, stats) -> dict:
    return {"iteration": iteration, "consumed_samples": consumed, "loss": stats.loss,
            "lm_loss": stats.lm_loss, "latent_loss": stats.latent_loss, "lr": stats.lr,
            "grad_norm": stats.grad_norm, "updated": stats.updated, "nan_skip": stats.nan_skip,
            "mean_latent_steps": stats.mean_latent_steps, "depth_counts": stats.depth_counts,
            "loss_scale": stats.loss_scale}


def _setup_distributed(config: RunConfig) -> bool:
    """Initialise torch.distributed (if the launcher asks for it) and the groups.

    Returns True when this call created the default process group (and so must destroy it)."""
    from megatron_alcot.parallel.launch import discover, init_distributed
    created = False
    if not (dist.is_available() and dist.is_initialized()) and discover().world_size > 1:
        init_distributed(backend=config.parallel.distributed_backend,
                         timeout_minutes=config.parallel.distributed_timeout_minutes)
        created = True
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.parallel.pipeline_model_parallel_size)
    return created
