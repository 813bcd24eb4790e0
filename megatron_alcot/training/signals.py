"""Stop cleanly on a signal (Slurm pre-emption, ``scancel``): every rank agrees, saves, exits 0.

    with DistributedSignalHandler(signal_by_name("SIGTERM")) as handler:   # --exit-signal
        for step in ...:
            train_step()
            if handler.signals_received():               # collective: call on every rank, every step
                save_checkpoint(...)
                write_last_exit(save_dir, "signal", iteration)   # read by slurm/_job.sh
                break                                    # the loop returns and the process exits 0

    DataLoader(..., worker_init_fn=ignore_stop_signals)  # workers leave the signal to the main process

The handler only records the signal; the loop decides when to act, at a step boundary.
``signals_received()`` agrees over the world with :func:`any_rank` (a MAX all-reduce on the
backend's device: the current CUDA device under NCCL, the CPU under gloo), so if any rank got the
signal every rank stops after the same step. Without ``torch.distributed`` it reports the local flag.
On exit the previous handler is restored.

Slurm delivers ``--signal`` to every process of the step, DataLoader workers included (and
``kill -TERM -<pgid>`` does the same): a worker that died of it would make torch raise "DataLoader
worker ... is killed by signal" in the main process, so workers ignore the stop signals.
"""
from __future__ import annotations

import json
import os
import signal
from typing import Dict

import torch
import torch.distributed as dist

from megatron_alcot.utils.atomic import atomic_output

# Megatron-LM's --exit-signal choices.
SIGNALS: Dict[str, int] = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT,
                           "SIGUSR1": signal.SIGUSR1, "SIGUSR2": signal.SIGUSR2}
LAST_EXIT_FILE = "last_exit.json"


def signal_by_name(name: str) -> int:
    """``"SIGTERM"`` -> ``signal.SIGTERM`` (one of :data:`SIGNALS`)."""
    if name not in SIGNALS:
        raise ValueError(f"--exit-signal {name}: choose one of {', '.join(SIGNALS)}")
    return SIGNALS[name]


def ignore_stop_signals(worker_id: int = 0) -> None:  # noqa: ARG001 - worker_init_fn signature
    """DataLoader ``worker_init_fn``: ignore every signal the main process may stop on."""
    for sig in SIGNALS.values():
        signal.signal(sig, signal.SIG_IGN)


def collective_device() -> torch.device:
    """Where a collective's tensors must live for the default group's backend (NCCL: CUDA)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one rank (collective; local without
    ``torch.distributed``). One host sync for the returned bool."""
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def write_last_exit(save_dir: str, reason: str, iteration: int) -> str:
    """Atomically write ``save_dir/last_exit.json`` ({"reason", "iteration", "slurm_job_id"});
    the batch script requeues only after a clean pre-emption exit. Call on rank 0."""
    path = os.path.join(save_dir, LAST_EXIT_FILE)
    os.makedirs(save_dir, exist_ok=True)
    record = {"reason": reason, "iteration": int(iteration),
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")}
    with atomic_output(path, "w") as f:
        f.write(json.dumps(record) + "\n")
    return path


class DistributedSignalHandler:
    """Context manager that records ``sig`` instead of dying (see the module docstring)."""

    def __init__(self, sig: int = signal.SIGTERM):
        self.sig = sig
        self._received = False
        self._previous = None
        self._installed = False

    def _handle(self, signum, frame):  # noqa: ARG002 - signal-handler signature
        self._received = True

    def local_signal_received(self) -> bool:
        return self._received

    def signals_received(self) -> bool:
        """True on every rank once any rank has received the signal (collective)."""
        return any_rank(self._received)

    def __enter__(self) -> "DistributedSignalHandler":
        self._received = False
        self._previous = signal.getsignal(self.sig)
        signal.signal(self.sig, self._handle)
        self._installed = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.release()
        return False

    def release(self) -> None:
        """Put the previous handler back (idempotent)."""
        if self._installed:
            signal.signal(self.sig, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
