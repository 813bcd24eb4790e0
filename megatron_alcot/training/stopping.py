"""When the training loop stops early: exit requests and NaN/Inf streaks.

    exits = ExitPolicy(signal_name="SIGTERM", duration_mins=230.0, interval=None, start_time=t0)
    with exits:                                   # installs the signal handler (signal_name given)
        ...
        reason = exits.reason(iteration)          # collective; "signal" | "duration" | "interval" | None

    nan = NanPolicy(max_nan_skips=3, emit=logger.print)
    nan.observe(iteration, stats)    # logs a skipped iteration; NanSkipLimitError at the limit
    nan.streak                       # consecutive NaN/Inf iterations so far (0 after a good one)

``reason`` asks, in this order: a signal on any rank (``--exit-signal-handler``, one all-reduce),
the wall clock on any rank (``--exit-duration-in-mins``, one all-reduce), then ``--exit-interval``.
Call it on every rank after every iteration: the first two are collectives.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from megatron_alcot.training import signals


class NanSkipLimitError(RuntimeError):
    """Too many consecutive iterations had a NaN/Inf loss or gradient norm."""


class ExitPolicy:
    """Asks after each iteration whether the run should stop now (see the module docstring)."""

    def __init__(self, *, signal_name: Optional[str] = None, duration_mins: Optional[float] = None,
                 interval: Optional[int] = None, start_time: float,
                 clock: Callable[[], float] = time.time):
        self.duration_mins, self.interval = duration_mins, interval
        self.start_time, self.clock = start_time, clock
        self.handler = (signals.DistributedSignalHandler(signals.signal_by_name(signal_name))
                        if signal_name is not None else None)

    @classmethod
    def from_config(cls, train_cfg, start_time: float) -> "ExitPolicy":
        """``--exit-signal-handler`` / ``--exit-signal``, ``--exit-duration-in-mins``, ``--exit-interval``."""
        return cls(signal_name=train_cfg.exit_signal if train_cfg.exit_signal_handler else None,
                   duration_mins=train_cfg.exit_duration_in_mins, interval=train_cfg.exit_interval,
                   start_time=start_time)

    def __enter__(self) -> "ExitPolicy":
        if self.handler is not None:
            self.handler.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.handler is not None:
            self.handler.release()
        return False

    def reason(self, iteration: int) -> Optional[str]:
        if self.handler is not None and self.handler.signals_received():
            return "signal"
        if self.duration_mins:
            if signals.any_rank((self.clock() - self.start_time) / 60.0 > self.duration_mins):
                return "duration"
        if self.interval and iteration % self.interval == 0:
            return "interval"
        return None


class NanPolicy:
    """Counts consecutive NaN/Inf iterations (the step skipped them) and stops at the limit."""

    def __init__(self, max_nan_skips: int, emit: Callable[[str], None] = print):
        self.max_nan_skips, self.emit = max_nan_skips, emit
        self.streak = 0

    def observe(self, iteration: int, stats) -> None:
        """``stats``: the iteration's ``nan_skip``, ``loss`` and ``grad_norm``."""
        self.streak = self.streak + 1 if stats.nan_skip else 0
        if not stats.nan_skip:
            return
        self.emit(f"iteration {iteration}: NaN/Inf loss or gradient norm (loss {stats.loss}, "
                  f"grad norm {stats.grad_norm}); step skipped "
                  f"({self.streak} in a row, limit --max-nan-skips {self.max_nan_skips})")
        if self.streak >= self.max_nan_skips:
            raise NanSkipLimitError(
                f"stopping at iteration {iteration}: {self.streak} consecutive iterations had a "
                f"NaN/Inf loss or gradient norm (--max-nan-skips {self.max_nan_skips}); no "
                "checkpoint was written for them. Lower --lr, raise --clip-grad's strength, "
                "or resume from the last checkpoint with --load")
