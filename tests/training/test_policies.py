"""Each decision of the training loop's policy objects, case by case."""
import os
import signal
from types import SimpleNamespace

import pytest

from megatron_alcot.training.checkpointer import Checkpointer
from megatron_alcot.training.log_window import LogWindow
from megatron_alcot.training.stopping import ExitPolicy, NanPolicy, NanSkipLimitError
from megatron_alcot.training.validator import Validator


def _checkpointer(tmp_path, interval=3, save=True, is_rank0=True):
    written, lines = [], []
    cp = Checkpointer(str(tmp_path) if save else None, interval, lambda i, c: written.append((i, c)),
                      is_rank0=is_rank0, emit=lines.append)
    return cp, written, lines


# --- Checkpointer ----------------------------------------------------------------------------------

def test_saves_at_each_interval_only(tmp_path):
    cp, written, _ = _checkpointer(tmp_path, interval=3)
    assert [cp.save(i, 8 * i) for i in range(1, 8)] == ["", "", "saved", "", "", "saved", ""]
    assert written == [(3, 24), (6, 48)] and cp.saved == [3, 6]


def test_interval_save_is_postponed_during_a_nan_streak(tmp_path):
    cp, written, lines = _checkpointer(tmp_path, interval=1)
    assert cp.save(4, 32, nan_streak=2) == "postponed"
    assert written == [] and lines == ["iteration 4: checkpoint postponed during a NaN/Inf streak"]
    assert cp.save(5, 40, nan_streak=0) == "saved"


def test_last_save_skips_an_iteration_just_saved_and_ignores_the_streak(tmp_path):
    cp, written, _ = _checkpointer(tmp_path, interval=5)
    cp.save(5, 40)
    assert cp.save(5, 40, last=True) == ""              # exit at a save interval: one checkpoint
    assert cp.save(7, 56, last=True, nan_streak=3) == "saved"
    assert written == [(5, 40), (7, 56)]


def test_last_save_without_interval_and_after_a_resume_at_the_end(tmp_path):
    cp, written, _ = _checkpointer(tmp_path, interval=None)
    assert [cp.save(i, 0) for i in (1, 2)] == ["", ""]
    assert cp.save(6, 48, last=True) == "saved"        # nothing saved by this run yet: write it
    assert written == [(6, 48)]


def test_nothing_without_save_dir(tmp_path):
    cp, written, _ = _checkpointer(tmp_path, interval=1, save=False)
    assert cp.save(1, 8) == "" and cp.save(1, 8, last=True) == ""
    cp.record_exit("finished", 1)
    assert written == [] and not os.listdir(tmp_path)


def test_finish_saves_unless_just_saved_then_records_the_exit(tmp_path):
    import json
    cp, written, _ = _checkpointer(tmp_path, interval=2)
    cp.save(4, 32)
    cp.finish(4, 32, "interval")
    assert written == [(4, 32)]
    assert json.loads((tmp_path / "last_exit.json").read_text())["reason"] == "interval"
    cp.finish(5, 40, "finished")
    assert written == [(4, 32), (5, 40)]
    assert json.loads((tmp_path / "last_exit.json").read_text())["iteration"] == 5


def test_last_exit_on_rank_0_only(tmp_path):
    import json
    cp, _, _ = _checkpointer(tmp_path / "r1", is_rank0=False)
    cp.record_exit("signal", 4)
    assert not (tmp_path / "r1").exists()
    cp, _, _ = _checkpointer(tmp_path / "r0")
    cp.record_exit("signal", 4)
    record = json.loads((tmp_path / "r0" / "last_exit.json").read_text())
    assert (record["reason"], record["iteration"]) == ("signal", 4)


# --- Validator -------------------------------------------------------------------------------------

def test_validates_every_interval_but_not_at_the_last_iteration():
    v = Validator(eval_iters=2, eval_interval=4, train_iters=12, run=lambda i: {"iteration": i})
    assert [i for i in range(1, 13) if v.should_validate(i)] == [4, 8]     # 12 is validated at the end
    assert v.validates_at_end() and v.validate(12) == {"iteration": 12}


def test_eval_iters_zero_turns_validation_off():
    v = Validator(eval_iters=0, eval_interval=1, train_iters=5, run=lambda i: {})
    assert not any(v.should_validate(i) for i in range(1, 6)) and not v.validates_at_end()
    assert not Validator(eval_iters=1, eval_interval=1, train_iters=0, run=dict).validates_at_end()


# --- ExitPolicy ------------------------------------------------------------------------------------

def test_exit_interval():
    with ExitPolicy(interval=3, start_time=0.0) as exits:
        assert [exits.reason(i) for i in range(1, 7)] == [None, None, "interval", None, None, "interval"]
    with ExitPolicy(start_time=0.0) as exits:
        assert exits.reason(3) is None


def test_exit_duration_by_the_clock():
    now = {"t": 100.0}
    exits = ExitPolicy(duration_mins=2.0, start_time=100.0, clock=lambda: now["t"])
    with exits:
        assert exits.reason(1) is None
        now["t"] = 100.0 + 120.0
        assert exits.reason(2) is None                  # exactly the limit: not past it
        now["t"] += 0.5
        assert exits.reason(3) == "duration"


def test_exit_on_signal_first_and_handler_restored():
    before = signal.getsignal(signal.SIGUSR1)
    exits = ExitPolicy(signal_name="SIGUSR1", duration_mins=1e-9, interval=1, start_time=0.0)
    with exits:
        assert exits.reason(1) == "duration"            # duration before interval
        os.kill(os.getpid(), signal.SIGUSR1)            # would end the process without the handler
        assert exits.reason(2) == "signal"              # signal before duration and interval
    assert signal.getsignal(signal.SIGUSR1) is before


def test_no_handler_without_exit_signal_handler():
    cfg = SimpleNamespace(exit_signal_handler=False, exit_signal="SIGTERM", exit_duration_in_mins=None,
                          exit_interval=None)
    assert ExitPolicy.from_config(cfg, 0.0).handler is None
    cfg.exit_signal_handler = True
    assert ExitPolicy.from_config(cfg, 0.0).handler.sig == signal.SIGTERM


# --- NanPolicy -------------------------------------------------------------------------------------

def _stats(nan):
    return SimpleNamespace(nan_skip=nan, loss=float("nan") if nan else 1.0,
                           grad_norm=float("nan") if nan else 0.5)


def test_nan_streak_counts_logs_and_resets():
    lines = []
    nan = NanPolicy(max_nan_skips=3, emit=lines.append)
    streaks = []
    for flag in (False, True, True, False, True):
        nan.observe(len(streaks) + 1, _stats(flag))
        streaks.append(nan.streak)
    assert streaks == [0, 1, 2, 0, 1]
    assert lines[0] == ("iteration 2: NaN/Inf loss or gradient norm (loss nan, grad norm nan); step "
                        "skipped (1 in a row, limit --max-nan-skips 3)")
    assert len(lines) == 3


def test_nan_streak_at_the_limit_aborts():
    nan = NanPolicy(max_nan_skips=2, emit=lambda line: None)
    nan.observe(3, _stats(True))
    with pytest.raises(NanSkipLimitError, match=r"stopping at iteration 4: 2 consecutive .*"
                                                r"--max-nan-skips 2\); no checkpoint"):
        nan.observe(4, _stats(True))


# --- LogWindow -------------------------------------------------------------------------------------

def test_log_every_interval_and_at_the_last_iteration():
    import torch
    w = LogWindow(max_depth=2, log_interval=4, train_iters=10, world=1, peak_flops=None,
                  device=torch.device("cpu"))
    assert [i for i in range(1, 11) if w.should_log(i)] == [4, 8, 10]
