"""The loop's sequence of decisions (log, validate, save, postpone, exit, NaN abort, last_exit.json)
over a grid of flags, against the rules of the loop as it was written in one function: the same
events in the same order. train_step is replaced by a stub, so no model runs."""
import itertools
import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch

from megatron_alcot.config import LoggingConfig, TrainConfig
from megatron_alcot.config.run import RunConfig
from megatron_alcot.training import train as train_module
from megatron_alcot.training.checkpointer import Checkpointer
from megatron_alcot.training.setup import Run
from megatron_alcot.training.stopping import NanSkipLimitError
from megatron_alcot.training.validator import Validator

GBS = 8


def reference_events(n, start, save, save_interval, eval_iters, eval_interval, exit_interval,
                     nan_iters, max_nan, signal_at, duration, log_interval):
    """The decisions of the single-function loop, transcribed rule by rule."""
    ev, it, nan_in_row, last_saved = [], start, 0, None
    while it < n:
        it += 1
        nan_in_row = nan_in_row + 1 if it in nan_iters else 0
        if it in nan_iters:
            ev.append(("nan", it, nan_in_row))
            if nan_in_row >= max_nan:
                return ev + [("abort", it)]
        if it % log_interval == 0 or it == n:
            ev.append(("log", it))
        if eval_iters and it % eval_interval == 0 and it < n:
            ev.append(("eval", it))
        if save and save_interval and it % save_interval == 0:
            if nan_in_row:
                ev.append(("postponed", it))
            else:
                ev.append(("save", it))
                last_saved = it
        reason = ("signal" if signal_at is not None and it >= signal_at else
                  "duration" if duration else
                  "interval" if exit_interval and it % exit_interval == 0 else None)
        if reason:
            if save and last_saved != it:
                ev.append(("save", it))
            if save:
                ev.append(("last_exit", reason, it))
            return ev + [("exit", reason, it)]
    if eval_iters and n > 0:
        ev.append(("eval", it))
    if save and last_saved != it:
        ev.append(("save", it))
    if save:
        ev.append(("last_exit", "finished", it))
    return ev


class _Logger:
    def __init__(self, events):
        self.events = events

    def print(self, line):
        if "NaN/Inf loss" in line:
            it, streak = line.split(":")[0].split()[1], line.split("(")[-1].split(" in a row")[0]
            self.events.append(("nan", int(it), int(streak)))
        elif "checkpoint postponed" in line:
            self.events.append(("postponed", int(line.split(":")[0].split()[1])))
        elif line.startswith("exiting at iteration"):
            words = line.split()
            self.events.append(("exit", words[4].strip("();"), int(words[3])))

    def log_train(self, record):
        self.events.append(("log", record["iteration"]))

    def close(self):
        pass


def new_events(tmp_path, monkeypatch, n, start, save, save_interval, eval_iters, eval_interval,
               exit_interval, nan_iters, max_nan, signal_at, duration, log_interval):
    events = []
    save_dir = str(tmp_path / "ckpt") if save else None
    t = TrainConfig(train_iters=n, save=save_dir, save_interval=save_interval, eval_iters=eval_iters,
                    eval_interval=eval_interval, exit_interval=exit_interval, max_nan_skips=max_nan,
                    exit_signal_handler=signal_at is not None, exit_signal="SIGUSR1",
                    exit_duration_in_mins=1e-9 if duration else None)
    config = RunConfig(train=t, logging=LoggingConfig(log_interval=log_interval))
    iteration = {"i": start}

    def step(ctx, it, forward_step):
        iteration["i"] += 1
        if signal_at is not None and iteration["i"] == signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        nan = iteration["i"] in nan_iters
        return SimpleNamespace(loss=float("nan") if nan else 1.0, lm_loss=1.0, latent_loss=0.0, lr=1e-3,
                               grad_norm=float("nan") if nan else 0.5, updated=not nan, nan_skip=nan,
                               mean_latent_steps=0.0, depth_counts=[1.0, 0.0, 0.0], loss_scale=None,
                               tokens=64, flops=1.0)

    def write(i, consumed):
        assert consumed == i * GBS
        events.append(("save", i))

    def last_exit(save_dir, reason, i):
        events.append(("last_exit", reason, i))

    monkeypatch.setattr(train_module, "train_step", step)
    monkeypatch.setattr("megatron_alcot.training.checkpointer.signals.write_last_exit", last_exit)
    logger = _Logger(events)
    run = Run(config=config, device=torch.device("cpu"), world=1, logger=logger, model=None,
              ctx=None, forward_step=None, train_it=None, train_iters=n, gbs=GBS, iteration=start,
              consumed=start * GBS,
              checkpointer=Checkpointer(save_dir, save_interval, write, emit=logger.print),
              validator=Validator(eval_iters, eval_interval, n,
                                  lambda i: events.append(("eval", i)) or {"iteration": i}))
    try:
        history = train_module._loop(run, start_time=time.time() - 60.0)
    except NanSkipLimitError as exc:
        return events + [("abort", int(str(exc).split()[3].rstrip(":")))]
    assert (history.iteration, history.consumed_samples) == (iteration["i"], iteration["i"] * GBS)
    assert history.saved_iterations == [e[1] for e in events if e[0] == "save"]
    return events


GRID = [case for case in itertools.product(
    [(6, 0), (6, 6), (7, 3)],              # (train iters, resumed at)
    [False, True],                         # --save
    [None, 1, 3],                          # --save-interval
    [(0, 1), (1, 2)],                      # (--eval-iters, --eval-interval)
    [None, 2, 5],                          # --exit-interval
    [((), 9), ((2, 3), 3), ((3, 4, 5), 2), ((6,), 1)],   # (NaN iterations, --max-nan-skips)
    [None, 4],                             # signal received during iteration
    [False],                               # --exit-duration-in-mins (tested below)
    [1, 4],                                # --log-interval
) if case[1] or not case[2]]             # --save-interval needs --save


@pytest.mark.parametrize("case", range(len(GRID)))
def test_same_decisions_as_the_single_function_loop(case, tmp_path, monkeypatch):
    (n, start), save, save_interval, (eval_iters, eval_interval), exit_interval, (nans, max_nan), \
        signal_at, duration, log_interval = GRID[case]
    args = (n, start, save, save_interval, eval_iters, eval_interval, exit_interval, set(nans), max_nan,
            signal_at, duration, log_interval)
    assert new_events(tmp_path, monkeypatch, *args) == reference_events(*args)


@pytest.mark.parametrize("save", [False, True])
def test_duration_exit_decisions(save, tmp_path, monkeypatch):
    args = (5, 0, save, None, 1, 2, None, set(), 3, None, True, 1)
    assert new_events(tmp_path, monkeypatch, *args) == reference_events(*args)
