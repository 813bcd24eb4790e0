"""When the training loop writes checkpoints, and how a run saves and resumes (the format:
docs/architecture.md §7).

    checkpointer = Checkpointer(save_dir="ckpts", save_interval=1000,
                                write=lambda iteration, consumed: ..., is_rank0=True, emit=print)
    checkpointer.save(iteration, consumed, nan_streak=nan.streak)  # every --save-interval
    checkpointer.finish(iteration, consumed, "signal")  # exit or end: save(last=True), record_exit
    checkpointer.save(iteration, consumed, last=True)   # unless this iteration was just saved
    checkpointer.record_exit("signal", iteration)       # rank 0: last_exit.json for slurm/_job.sh
    checkpointer.saved                                  # iterations this run wrote

    write = run_writer(config, model, optimizer, scheduler, engine=None)   # the ``write`` above
    iteration, consumed = resume(config, model, optimizer, scheduler, emit, engine=None)   # --load

Without ``--save`` nothing is written. At an interval inside a NaN/Inf streak the save is postponed
(the weights are intact, but a resume from there would silently skip the bad data). At the last
iteration of the run or of an early exit the checkpoint is written unless this iteration was just
saved, NaN streak or not.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch.distributed as dist

from megatron_alcot.checkpointing import checkpoint as ckpt
from megatron_alcot.training import signals


class Checkpointer:
    def __init__(self, save_dir: Optional[str], save_interval: Optional[int],
                 write: Callable[[int, int], None], *, is_rank0: bool = True,
                 emit: Callable[[str], None] = print):
        self.save_dir, self.save_interval, self.write = save_dir, save_interval, write
        self.is_rank0, self.emit = is_rank0, emit
        self.saved: List[int] = []

    def due(self, iteration: int) -> bool:
        """An interval save is due after ``iteration``."""
        return bool(self.save_dir and self.save_interval and iteration % self.save_interval == 0)

    def save(self, iteration: int, consumed: int, *, nan_streak: int = 0, last: bool = False) -> str:
        """Returns what happened: ``"saved"``, ``"postponed"`` or ``""``."""
        if last:
            if not self.save_dir or (self.saved and self.saved[-1] == iteration):
                return ""
        elif not self.due(iteration):
            return ""
        elif nan_streak:
            self.emit(f"iteration {iteration}: checkpoint postponed during a NaN/Inf streak")
            return "postponed"
        self.write(iteration, consumed)
        self.saved.append(iteration)
        return "saved"

    def finish(self, iteration: int, consumed: int, reason: str) -> None:
        """The run ends after ``iteration`` (``reason``: finished, signal, duration, interval)."""
        self.save(iteration, consumed, last=True)
        self.record_exit(reason, iteration)

    def record_exit(self, reason: str, iteration: int) -> None:
        if self.is_rank0 and self.save_dir:      # slurm/_job.sh requeues only after a clean stop
            signals.write_last_exit(self.save_dir, reason, iteration)


def run_writer(config, model, optimizer, scheduler, engine=None) -> Callable[[int, int], None]:
    """``write(iteration, consumed)`` for :class:`Checkpointer`: the run's checkpoint (with a
    DeepSpeed ``engine``, its own state too), then ``--keep-last-checkpoints`` on rank 0."""
    def write(iteration: int, consumed: int) -> None:
        opt, extra, hooks = optimizer, {}, {}
        if engine is not None:     # DeepSpeed keeps the optimizer state; our files hold the rest
            from megatron_alcot.checkpointing.deepspeed_checkpoint import full_parameters, save_engine_state
            opt = None
            hooks = dict(engine_state=lambda tmp: save_engine_state(engine, tmp),
                         full_params=lambda: full_parameters(engine))
        elif optimizer.grad_scaler is not None:
            extra["grad_scaler"] = optimizer.grad_scaler.state_dict()
        ckpt.save_checkpoint(config.train.save, iteration, model, opt, scheduler,
                             consumed_samples=consumed, config_dict=config.to_dict(), extra=extra,
                             **hooks)
        keep = config.train.keep_last_checkpoints
        if keep and (not dist.is_initialized() or dist.get_rank() == 0):
            from megatron_alcot.checkpointing.retention import prune_checkpoints
            prune_checkpoints(config.train.save, keep)
    return write


def resume(config, model, optimizer, scheduler, emit: Callable[[str], None], engine=None):
    """``--load``: restore the latest checkpoint there; returns ``(iteration, consumed_samples)``,
    ``(0, 0)`` when there is none yet or with ``--finetune`` (weights only)."""
    t = config.train
    if ckpt.latest_iteration(t.load) is None:
        emit(f"--load {t.load}: no checkpoint there yet; training from scratch")
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
        emit(f"--finetune: loaded weights of iteration {info['iteration']} from {t.load}; "
             "iteration and data restart at 0")
        return 0, 0
    scaler_state = (info.get("extra") or {}).get("grad_scaler")
    if scaler_state and optimizer.grad_scaler is not None:
        optimizer.grad_scaler.load_state_dict(scaler_state)
    emit(f"resumed from {info.get('path', t.load)} at iteration {info['iteration']} "
         f"({info['consumed_samples']} samples consumed)")
    return int(info["iteration"]), int(info["consumed_samples"])
