"""Stop cleanly on SIGTERM (Slurm pre-emption, ``scancel``): every rank agrees, saves, exits 0.

    with DistributedSignalHandler() as handler:        # installs the handler (default SIGTERM)
        for step in ...:
            train_step()
            if handler.signals_received():               # collective: call on every rank, every step
                save_checkpoint(...)
                break                                    # the loop returns and the process exits 0

The handler only records the signal; the loop decides when to act, at a step boundary.
``signals_received()`` all-reduces the flag (MAX) over the world, so if any rank got the signal every
rank stops after the same step. Without ``torch.distributed`` it reports the local flag.
On exit the previous handler is restored.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist


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
        if not (dist.is_available() and dist.is_initialized()):
            return self._received
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            from megatron_alcot.parallel.device import get_device
            device = get_device()
        flag = torch.tensor([1 if self._received else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

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
