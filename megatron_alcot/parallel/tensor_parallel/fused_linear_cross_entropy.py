"""LM head and cross entropy in one pass over row chunks, without the ``[n, V]`` logits.

    loss, per_token = fused_linear_cross_entropy(hidden, weight_parallel, target, weights,
                                                 vocab_size=32000, chunk_rows=1024)
    loss.backward()          # d loss / d hidden and d loss / d weight, computed in the forward

``loss = Σ_t weights_t · CE_t`` (e.g. ``weights = loss_mask / loss_mask.sum()``) with
``logits = hidden @ weight_parallel.T``; ``per_token`` holds the detached ``CE_t`` (fp32) for logging
and analysis. Because the loss is a weighted sum, the gradient of every chunk is known as soon as
its logits are: ``(softmax - onehot) · weights_t``. Each chunk's logits, softmax and gradient stay
in cache, and the backward only scales the two stored gradients by the incoming scalar. The matmul
FLOPs are those of the unfused path; what goes away is several full passes over ``n x V`` fp32
tensors (the upcast, max, exp, normalise, one-hot subtraction, the gradient's downcast).

Tensor parallel: ``weight_parallel`` is this rank's vocab slice ``[V/tp, h]`` and ``hidden`` must be
replicated and have passed through ``copy_to_tensor_model_parallel_region`` (whose backward sums
the per-rank ``d hidden``); three small all-reduces per chunk give the global max, normaliser and
target logit. Vocabulary padding (ids >= ``vocab_size``) takes no mass, as in the model's LM head.
Under autocast the matmuls run in the autocast dtype and everything else in fp32; plain fp32 CPU
matmuls run in the library ``gemm_backend`` picks (``gemm.py``).

Chunk size by device (:func:`chunk_rows_for`): each chunk reads the weight twice (logits, then
``d hidden``) and adds one ``[V/tp, h]`` fp32 term to ``d weight``, so fewer, larger chunks pay
off where memory allows. On CPUs a chunk holds about 4 MiB of fp32 logits (it stays in cache:
32 rows at V = 50304); on GPUs about 1 GiB and at least 4096 rows, and never more than
``GPU_MAX_CHUNKS`` chunks per call, so the weight is read at most ``2 · GPU_MAX_CHUNKS`` times per
micro-batch::

    rows = chunk_rows_for(hidden.device, weight_parallel.shape[0], num_rows=hidden.numel() // h)
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from megatron_alcot.parallel.tensor_parallel import gemm
from megatron_alcot.parallel.tensor_parallel.cross_entropy import (LOG2E, _all_reduce, _local_target,
                                                                   mask_padded_vocab)


CHUNK_LOGIT_BYTES = {"cpu": 4 << 20, "cuda": 1 << 30}   # fp32 logits per chunk
MIN_CHUNK_ROWS = {"cpu": 32, "cuda": 4096}
GPU_MAX_CHUNKS = 4


def chunk_rows_for(device, vocab_per_rank: int, num_rows: int) -> int:
    """Rows per chunk for ``num_rows`` rows against a ``[vocab_per_rank, h]`` weight on ``device``
    (a ``torch.device`` or its type; accelerators other than CPU are sized like CUDA)."""
    kind = device if isinstance(device, str) else device.type
    kind = "cpu" if kind == "cpu" else "cuda"
    rows = max(MIN_CHUNK_ROWS[kind], CHUNK_LOGIT_BYTES[kind] // (4 * max(1, vocab_per_rank)))
    if kind == "cuda":
        rows = max(rows, -(-num_rows // GPU_MAX_CHUNKS))
    return max(1, min(rows, num_rows))


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, vocab_size: int,
                  buffer: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    if backend == "onednn":
        logits = gemm.matmul_nt(h, weight, backend)
    elif h.dtype == torch.float32:   # one reused buffer: a fresh [rows, V] output each chunk is slower
        logits = torch.mm(h, weight.t(), out=buffer[: h.shape[0]])
    else:
        logits = (h @ weight.t()).float()
    return mask_padded_vocab(logits, vocab_size)


def _backprop_chunk(probs: torch.Tensor, h: torch.Tensor, w_mm: torch.Tensor, backend: str,
                    grad_hidden_rows: torch.Tensor, grad_weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Write ``probs @ w`` into ``grad_hidden_rows``; return ``grad_weight + probs.T @ h`` (fp32;
    ``grad_weight`` None on the first chunk)."""
    if backend == "onednn":
        grad_hidden_rows.copy_(gemm.matmul_nn(probs, w_mm, backend))
        g_w = gemm.weight_grad(h, probs, backend)
    elif h.dtype == torch.float32:       # BLAS writes and accumulates in place: no extra pass
        torch.mm(probs, w_mm, out=grad_hidden_rows)
        return torch.mm(probs.t(), h) if grad_weight is None else grad_weight.addmm_(probs.t(), h)
    else:
        g = probs.to(h.dtype)
        grad_hidden_rows.copy_(g @ w_mm)
        g_w = (g.t() @ h).float()
    return g_w if grad_weight is None else grad_weight.add_(g_w)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, weights, vocab_size, chunk_rows, gemm_backend):
        shape = target.shape
        h_all = hidden.reshape(-1, hidden.shape[-1])
        target = target.reshape(-1)
        w_rows = weights.reshape(-1).float()
        mm_dtype = _matmul_dtype(weight)
        w_mm = weight.to(mm_dtype)
        backend = gemm.resolve_gemm_backend(gemm_backend, w_mm, w_mm)   # h is cast to w_mm's dtype
        local, outside = _local_target(target, weight.shape[0])
        per_token = torch.empty(target.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(h_all.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = None
        buffer = None if backend == "onednn" else torch.empty(
            min(chunk_rows, h_all.shape[0]), weight.shape[0], dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for r0 in range(0, h_all.shape[0], chunk_rows):
                h = h_all[r0:r0 + chunk_rows].to(mm_dtype)
                rows = slice(r0, r0 + h.shape[0])
                logits = _chunk_logits(h, w_mm, vocab_size, buffer, backend)
                row_max = _all_reduce(logits.amax(dim=-1), op=dist.ReduceOp.MAX)
                logits.sub_(row_max.unsqueeze(-1))
                idx = local[rows].unsqueeze(-1)
                picked = _all_reduce(logits.gather(-1, idx).squeeze(-1).masked_fill(outside[rows], 0.0))
                probs = logits.mul_(LOG2E).exp2_()          # = exp(logits), see LOG2E
                sum_exp = _all_reduce(probs.sum(dim=-1))
                per_token[rows] = sum_exp.log() - picked
                # d/d logits of w·CE = w·(softmax - onehot), built in place over the chunk.
                probs.mul_((w_rows[rows] / sum_exp).unsqueeze(-1))
                probs.scatter_add_(-1, idx, (-w_rows[rows] * (~outside[rows]).float()).unsqueeze(-1))
                grad_weight = _backprop_chunk(probs, h, w_mm, backend, grad_hidden[rows], grad_weight)
        if grad_weight is None:      # no rows
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.hidden_shape = hidden.shape
        loss = (per_token * w_rows).sum()
        per_token = per_token.view(shape)
        ctx.mark_non_differentiable(per_token)
        return loss, per_token

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.float()
        return ((grad_hidden * scale).to(ctx.dtypes[0]).view(ctx.hidden_shape),
                (grad_weight * scale).to(ctx.dtypes[1]), None, None, None, None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight_parallel: torch.Tensor,
                               target: torch.Tensor, weights: torch.Tensor, vocab_size: int,
                               chunk_rows: int = 1024, gemm_backend: Union[str, gemm.GemmLibrary] = "auto"):
    """``(Σ weights·CE, detached per-token CE)`` of ``hidden @ weight_parallel.T``; see the module doc."""
    if hidden.shape[:-1] != target.shape or weights.shape != target.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)}, target {tuple(target.shape)} and weights "
                         f"{tuple(weights.shape)} must agree on the token dimensions")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return _FusedLinearCrossEntropy.apply(hidden, weight_parallel, target, weights, int(vocab_size),
                                          int(chunk_rows), gemm_backend)


__all__ = ["chunk_rows_for", "fused_linear_cross_entropy"]
