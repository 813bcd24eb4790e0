"""Learning-rate schedule with Megatron-LM's semantics.

    >>> sched = OptimizerParamScheduler(optimizer, max_lr=3e-4, min_lr=3e-5, warmup_iters=1000,
    ...                                 decay_iters=50000, decay_style="cosine")
    >>> sched.get_lr(0), sched.get_lr(1000), sched.get_lr(50000)
    (0.0, 0.0003, 3e-05)
    >>> sched.step()            # after each successful optimizer step

Warm-up rises linearly from ``init_lr`` to ``max_lr`` over ``warmup_iters``; the decay then runs
from ``max_lr`` to ``min_lr`` over the remaining ``decay_iters - warmup_iters`` and stays at
``min_lr`` afterwards. The LR used by the update of iteration ``i`` (1-based) is ``get_lr(i - 1)``:
the scheduler counts completed updates, and skipped (NaN/overflow) steps do not advance it.
"""
from __future__ import annotations

import math


def lr_at(num_steps: int, *, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
          decay_style: str, init_lr: float = 0.0) -> float:
    """Closed-form learning rate after ``num_steps`` updates."""
    if warmup_iters > 0 and num_steps <= warmup_iters:
        return init_lr + (max_lr - init_lr) * num_steps / warmup_iters
    if decay_style == "constant":
        return max_lr
    if num_steps > decay_iters:
        return min_lr
    span = decay_iters - warmup_iters
    ratio = (num_steps - warmup_iters) / span if span > 0 else 1.0
    if decay_style == "linear":
        coeff = 1.0 - ratio
    elif decay_style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:
        raise ValueError(f"unknown lr decay style {decay_style!r}")
    return min_lr + coeff * (max_lr - min_lr)


class OptimizerParamScheduler:
    """Sets ``group['lr']`` of every param group; ``state_dict`` makes resume exact."""

    def __init__(self, optimizer, *, max_lr: float, min_lr: float, warmup_iters: int,
                 decay_iters: int, decay_style: str = "cosine", init_lr: float = 0.0):
        self.optimizer = optimizer
        self.max_lr, self.min_lr, self.init_lr = float(max_lr), float(min_lr), float(init_lr)
        self.warmup_iters, self.decay_iters = int(warmup_iters), int(decay_iters)
        self.decay_style = decay_style
        self.num_steps = 0
        self._apply()

    @classmethod
    def from_config(cls, optimizer, optim_cfg, train_iters: int) -> "OptimizerParamScheduler":
        decay = optim_cfg.lr_decay_iters if optim_cfg.lr_decay_iters is not None else train_iters
        return cls(optimizer, max_lr=optim_cfg.lr, min_lr=optim_cfg.min_lr,
                   warmup_iters=optim_cfg.warmup_iters(decay), decay_iters=max(decay, 1),
                   decay_style=optim_cfg.lr_decay_style, init_lr=optim_cfg.lr_warmup_init)

    def get_lr(self, num_steps: int | None = None) -> float:
        steps = self.num_steps if num_steps is None else num_steps
        return lr_at(steps, max_lr=self.max_lr, min_lr=self.min_lr, warmup_iters=self.warmup_iters,
                     decay_iters=self.decay_iters, decay_style=self.decay_style, init_lr=self.init_lr)

    def _apply(self) -> None:
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, increment: int = 1) -> None:
        self.num_steps += increment
        self._apply()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "init_lr": self.init_lr, "warmup_iters": self.warmup_iters,
                "decay_iters": self.decay_iters, "decay_style": self.decay_style}

    def load_state_dict(self, state: dict) -> None:
        # The schedule's shape comes from the current flags (Megatron's default behaviour);
        # only the progress is restored.
        self.num_steps = int(state["num_steps"])
        self._apply()
