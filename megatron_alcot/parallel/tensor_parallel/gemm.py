"""Which library runs the fp32 GEMMs of the linear layers and the LM head (``--cpu-gemm-backend``).

    lib = gemm_library("auto")                     # once, when a layer is built: GemmLibrary("onednn")
    y = lib.linear(x, weight, bias)                # == F.linear(x, weight, bias), same gradients
    y = linear(x, weight, bias, backend="auto")    # the same, resolved per call
    backend = resolve_gemm_backend("auto", x, weight)          # "torch" or "onednn" for this call
    logits = matmul_nt(h, weight, backend)         # h @ weight.T   (plain tensors, no autograd)
    grad_h = matmul_nn(g, weight, backend)         # g @ weight
    grad_w = weight_grad(h, g, backend)            # g.T @ h, possibly a transposed view

* ``torch``: torch's own kernels (``F.linear``, ``torch.mm``): MKL's sgemm in the x86 wheels.
* ``onednn``: oneDNN's fp32 GEMM through ``torch.ops.mkldnn._linear_pointwise`` (the op torch's
  inductor uses for CPU linears), with the backward written here as two more GEMMs.
* ``auto``: the library :mod:`megatron_alcot.hardware` measured faster for fp32 GEMMs on this
  machine (``onednn`` only where it was at least 1.15x torch's speed). MKL picks its kernels by
  CPU vendor: on an AMD EPYC (Zen 5) its sgemm measured 108 GMAC/s on 2 cores against oneDNN's
  240 (``bench/bench_gemm.py``), while on a Zen 3 training steps were faster with torch's; the
  vendor alone cannot tell, so it is timed.

Only plain fp32 CPU calls are affected: under bf16/fp16 autocast torch already calls oneDNN, and
GPUs use cuBLAS. Both libraries compute the same products; results agree to fp32 rounding, not
bitwise, so a run should keep one backend across resumes for bitwise-equal losses.

oneDNN builds a kernel per GEMM shape (about 0.5 ms the first time a shape is seen, cached after),
so callers whose row count varies from step to step round it up with :func:`bucket_rows` (the lap
runner does, for compacted laps).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from megatron_alcot import hardware
from megatron_alcot.config import GEMM_BACKENDS


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """torch was built with oneDNN and its fp32 linear op runs here."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:    # explicit device and dtype: the first caller may be building a model on the meta device
        x, w = torch.ones(2, 3, device="cpu", dtype=torch.float32), torch.ones(4, 3, device="cpu", dtype=torch.float32)
        return bool(torch.equal(_lp(x, w), torch.full((2, 4), 3.0, device="cpu")))
    except (RuntimeError, NotImplementedError):
        return False


def cpu_vendor() -> str:
    """``vendor_id`` of the first CPU in /proc/cpuinfo (e.g. GenuineIntel, AuthenticAMD); '' if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def auto_prefers_onednn() -> bool:
    """What ``auto`` picks for fp32 CPU GEMMs on this machine (measured, see megatron_alcot.hardware)."""
    return hardware.gemm_choice().choice == "onednn"


_MACHINE: Optional[Tuple[bool, bool]] = None


def machine_support() -> Tuple[bool, bool]:
    """``(oneDNN usable, auto picks it)``, probed once. :func:`gemm_library` reads it when a layer
    is built, so a forward never probes; :func:`megatron_alcot.hardware.set_machine`
    (another rank's answers, a test's fake) clears it."""
    global _MACHINE
    if _MACHINE is None:
        _MACHINE = (onednn_available(), auto_prefers_onednn())
    return _MACHINE


def _forget_machine() -> None:
    global _MACHINE
    _MACHINE = None


hardware.on_change(_forget_machine)


def _plain_fp32_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


def gemm_library(backend: Union[str, "GemmLibrary"]) -> "GemmLibrary":
    """``--cpu-gemm-backend backend`` on this machine: ``onednn`` where asked for (or, for ``auto``,
    measured faster) and usable, else ``torch``. A library already resolved is returned as is."""
    if isinstance(backend, GemmLibrary):
        return backend
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"--cpu-gemm-backend {backend!r} is unknown; choose one of {', '.join(GEMM_BACKENDS)}")
    if backend == "torch":
        return GemmLibrary("torch")
    usable, auto = machine_support()
    return GemmLibrary("onednn" if (usable if backend == "onednn" else auto) else "torch")


def resolve_gemm_backend(backend: Union[str, "GemmLibrary"], x: torch.Tensor, weight: torch.Tensor) -> str:
    """``torch`` or ``onednn``: the library that runs ``x @ weight.T`` for this call."""
    return gemm_library(backend).for_call(x, weight)


def bucket_rows(n: int) -> int:
    """``n`` rounded up to one of at most 8 sizes per octave (multiples of 64 below 1024), so
    varying row counts reuse a few GEMM kernels; at most 1/8 of the rows are padding above 512."""
    step = max(64, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


@torch.library.custom_op("megatron_alcot::onednn_mm_nt", mutates_args=())
def _onednn_mm_nt(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


@_onednn_mm_nt.register_fake
def _(a, b, bias):
    return a.new_empty((a.shape[0], b.shape[0]))


def _lp(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b.T + bias`` in oneDNN. Under torch.compile through an opaque custom op (inductor's own
    lowering of the aten op accepts frozen weights only); eagerly without its dispatch cost."""
    if torch.compiler.is_compiling():
        return _onednn_mm_nt(a, b, bias)
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def matmul_nt(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    """``a @ b.T`` for 2-D ``a [m, k]``, ``b [n, k]``."""
    return _lp(a, b) if backend == "onednn" else a @ b.t()


def matmul_nn(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    """``a @ b`` for 2-D ``a [m, k]``, ``b [k, n]``."""
    return _lp(a, b.t()) if backend == "onednn" else a @ b


def weight_grad(x: torch.Tensor, dy: torch.Tensor, backend: str) -> torch.Tensor:
    """``dy.T @ x`` (``[out, in]``) for rows ``x [n, in]``, ``dy [n, out]``; may be a transposed view."""
    if backend != "onednn":
        return dy.t() @ x
    # oneDNN reads the transposed operands fastest when the one with fewer rows comes first
    # (measured: 1.3-2x between the two orders); the other order returns the transpose.
    if x.shape[1] <= dy.shape[1]:
        return _lp(x.t(), dy.t()).t()
    return _lp(dy.t(), x.t())


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return _lp(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        rows, weight = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1])
        if not dy.is_contiguous():
            dy = dy.contiguous()
        dx = matmul_nn(dy, weight, "onednn").view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dw = weight_grad(rows, dy, "onednn") if ctx.needs_input_grad[1] else None
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


@dataclass(frozen=True)
class GemmLibrary:
    """``--cpu-gemm-backend`` resolved on this machine (:func:`gemm_library`): ``name`` (``torch`` or
    ``onednn``) runs the plain fp32 CPU GEMMs; every other call (GPU, other dtypes, under autocast)
    runs torch's. A plain attribute, so a compiled forward reads it without a graph break."""

    name: str

    def for_call(self, x: torch.Tensor, weight: torch.Tensor) -> str:
        """``torch`` or ``onednn``: the library that runs ``x @ weight.T`` for this call."""
        return "onednn" if self.name == "onednn" and _plain_fp32_cpu(x, weight) else "torch"

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` in the library :meth:`for_call` picks."""
        if self.for_call(x, weight) == "onednn":
            return _OneDNNLinear.apply(x if x.is_contiguous() else x.contiguous(), weight, bias)
        return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           backend: Union[str, "GemmLibrary"] = "auto") -> torch.Tensor:
    """``F.linear(x, weight, bias)`` run by the library :func:`resolve_gemm_backend` picks."""
    return gemm_library(backend).linear(x, weight, bias)


__all__ = ["GEMM_BACKENDS", "GemmLibrary", "auto_prefers_onednn", "bucket_rows", "cpu_vendor", "gemm_library",
           "linear", "machine_support",
           "matmul_nn", "matmul_nt", "onednn_available", "resolve_gemm_backend", "weight_grad"]
