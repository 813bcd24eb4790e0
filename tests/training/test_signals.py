"""Signals as Slurm delivers them: the handler records the signal instead of dying, every rank
agrees on the stop through a collective on the backend's device, DataLoader workers ignore it, the
run saves, writes last_exit.json and exits 0."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from dist_utils import run_distributed
from megatron_alcot.arguments import parse_args
from megatron_alcot.training.signals import DistributedSignalHandler
from _tiny import tiny_argv

PRETRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "pretrain_alcot.py")


def test_records_signal_and_restores_previous_handler():
    before = signal.getsignal(signal.SIGTERM)
    with DistributedSignalHandler() as handler:
        assert not handler.signals_received()
        os.kill(os.getpid(), signal.SIGTERM)        # would end the process without the handler
        assert handler.signals_received() and handler.local_signal_received()
    assert signal.getsignal(signal.SIGTERM) is before


def test_other_signal_numbers():
    with DistributedSignalHandler(signal.SIGUSR1) as handler:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.signals_received()


def _one_rank_signalled(rank, world):
    with DistributedSignalHandler() as handler:
        seen = [handler.signals_received()]
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        seen.append(handler.signals_received())      # collective: rank 0 learns of rank 1's signal
        seen.append(handler.local_signal_received())
    t = torch.zeros(1)
    torch.distributed.all_reduce(t)                  # the world still works afterwards
    return seen


@pytest.mark.slow
def test_all_ranks_agree():
    assert run_distributed(_one_rank_signalled, 2) == [[False, True, False], [False, True, True]]


# --- the device of the agreeing collective, and the guard that checks it -------------------------

def test_guard_rejects_a_tensor_off_the_code_device():
    from dist_utils import collective_device_guard
    original = torch.distributed.all_reduce
    with collective_device_guard(nccl_like=True):
        with pytest.raises(AssertionError, match=r"dist.all_reduce got a tensor on meta"):
            torch.distributed.all_reduce(torch.zeros(1, device="meta"))
    assert torch.distributed.all_reduce is original                     # restored


def _agree(rank, world):
    from megatron_alcot.training.signals import any_rank, collective_device
    return [any_rank(rank == 1), any_rank(False), str(collective_device())]


@pytest.mark.slow
def test_any_rank_on_the_backend_device():
    assert run_distributed(_agree, 2, nccl_like=True) == [[True, False, "cpu"]] * 2


def _duration_exit(rank, world, save):
    from megatron_alcot.training.train import train
    history = train(parse_args(tiny_argv(train_iters=5, save=save, exit_duration_in_mins=1e-9)))
    return history.exit_reason, history.iteration


@pytest.mark.slow
def test_exit_duration_stops_every_rank_after_the_same_iteration(tmp_path):
    out = run_distributed(_duration_exit, 2, str(tmp_path), nccl_like=True)
    assert out == [("duration", 1)] * 2
    assert json.loads((tmp_path / "last_exit.json").read_text())["reason"] == "duration"


# --- --exit-signal, last_exit.json ------------------------------------------------------------------

def test_exit_signal_usr1_saves_and_writes_last_exit(tmp_path):
    from megatron_alcot.checkpointing import latest_iteration
    from megatron_alcot.training.train import train
    calls = []

    def signal_on_second_forward(model):
        def hook(module, inputs, output):
            calls.append(1)
            if len(calls) == 2:                   # inside step 2 (one micro-batch per step here)
                os.kill(os.getpid(), signal.SIGUSR1)
        model.register_forward_hook(hook)

    argv = tiny_argv(train_iters=6, global_batch_size=2, save=str(tmp_path), exit_signal_handler=True,
                     exit_signal="SIGUSR1")
    history = train(parse_args(argv), on_model_built=signal_on_second_forward)
    assert (history.exit_reason, history.iteration) == ("signal", 2)
    assert latest_iteration(str(tmp_path)) == 2
    record = json.loads((tmp_path / "last_exit.json").read_text())
    assert (record["reason"], record["iteration"]) == ("signal", 2)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_exit_signal_flag_is_checked():
    from megatron_alcot.arguments import parse_args
    assert parse_args(tiny_argv(exit_signal="SIGUSR2")).train.exit_signal == "SIGUSR2"
    assert parse_args(tiny_argv()).train.exit_signal == "SIGTERM"
    with pytest.raises(SystemExit):
        parse_args(tiny_argv(exit_signal="SIGKILL"))


# --- the whole process group signalled, DataLoader workers included ---------------------------------

@pytest.mark.slow
def test_process_group_sigterm_with_workers_saves_and_exits_0(tmp_path):
    """``kill -TERM -<pgid>`` as Slurm's --signal does: the workers ignore it, the main process
    finishes the step, saves and exits 0 (before, a worker died and torch raised in the loop)."""
    from megatron_alcot.checkpointing import latest_iteration
    argv = tiny_argv(train_iters=2000, save=str(tmp_path), exit_signal_handler=True, num_workers=2,
                     quiet=False, log_interval=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MEGATRON_ALCOT_DEVICE="cpu")
    proc = subprocess.Popen([sys.executable, PRETRAIN, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:                      # wait until the workers deliver batches
            lines.append(line)
            m = re.search(r"\biter (\d+)/", line)
            if m and int(m.group(1)) >= 3:
                break
        workers = _children(proc.pid)
        assert len(workers) >= 2, ("expected 2 DataLoader workers", workers, "".join(lines))
        os.killpg(proc.pid, signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log
    assert "DataLoader worker" not in log, log
    record = json.loads((tmp_path / "last_exit.json").read_text())
    assert record["reason"] == "signal", log
    assert latest_iteration(str(tmp_path)) == record["iteration"] >= 3, log
    assert f"exiting at iteration {record['iteration']} (signal)" in log


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]
