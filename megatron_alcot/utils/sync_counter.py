"""Count the operations that make the host wait for the device (host syncs), on any device.

    with SyncCounter() as syncs:
        out = model(tokens, labels=labels)
        out.loss.backward()
    syncs.total, syncs.by_op        # e.g. 5, {"aten._local_scalar_dense": 3, "aten.nonzero": 2}

A ``TorchDispatchMode`` sees every aten call, so the count is the same on CPU (where nothing
actually waits) as on CUDA, and a test can hold a code path to a budget without a GPU. Counted:

* a tensor read into Python: ``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``if t:``, and
  ``.tolist()`` (``aten._local_scalar_dense``; ``tolist`` bypasses dispatch, so the counter wraps
  ``Tensor.tolist`` inside its block and counts one sync per call);
* ops whose output shape depends on values: ``nonzero``, ``masked_select``, ``unique``,
  boolean-mask indexing and assignment (``index`` / ``index_put_`` with a bool index),
  ``repeat_interleave`` without ``output_size``, ``bincount`` (sizes its output from the max);
* copies between devices (``.cpu()``, ``.to("cuda")`` from pageable memory): visible only where two
  devices exist; on CPU-only machines ``.cpu()`` of a CPU tensor is no copy and is not counted.

Where CUDA exists, ``SyncCounter(cuda_debug=True)`` also sets ``torch.cuda.set_sync_debug_mode``
to ``"warn"`` and counts the warnings the CUDA runtime reports, as a cross-check.
"""
from __future__ import annotations

import collections
import warnings
from typing import Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

ALWAYS_SYNC = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.bincount.default, aten.is_nonzero.default,
}
try:   # a few overloads only exist in some builds
    ALWAYS_SYNC.add(aten._unique.default)
except AttributeError:
    pass
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
             aten._index_put_impl_.default}
COPY_OPS = {aten._to_copy.default, aten.copy_.default}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(t is not None and t.dtype == torch.bool for t in indices)


def _crosses_devices(func, args, kwargs) -> bool:
    if func is aten._to_copy.default:
        device = kwargs.get("device")
        return device is not None and torch.device(device).type != args[0].device.type
    return args[0].device.type != args[1].device.type


class SyncCounter(TorchDispatchMode):
    """Counts host syncs in its ``with`` block (see the module docstring)."""

    def __init__(self, cuda_debug: bool = False):
        super().__init__()
        self.by_op: Dict[str, int] = collections.Counter()
        self.cuda_debug = cuda_debug and torch.cuda.is_available()
        self.cuda_warnings = 0

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def _count(self, name: str) -> None:
        self.by_op[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in ALWAYS_SYNC:
            self._count(str(func.overloadpacket))
        elif func in INDEX_OPS and _has_bool_index(args):
            self._count(str(func.overloadpacket) + "[bool]")
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._count("aten.repeat_interleave")
        elif func in COPY_OPS and _crosses_devices(func, args, kwargs):
            self._count("device copy")
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter, original = self, self._tolist

        def tolist(t):
            counter._count("Tensor.tolist")
            return original(t)

        torch.Tensor.tolist = tolist
        if self.cuda_debug:
            self._previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        torch.Tensor.tolist = self._tolist
        if self.cuda_debug:
            self.cuda_warnings = sum("synchronizing" in str(w.message) for w in self._caught)
            self._warnings.__exit__(*exc)
            torch.cuda.set_sync_debug_mode(self._previous)
        return out


__all__ = ["SyncCounter"]
