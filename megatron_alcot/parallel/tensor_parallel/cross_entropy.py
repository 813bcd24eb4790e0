"""Cross entropy and target probabilities over vocab-parallel logits, without gathering the vocab.

    loss = vocab_parallel_cross_entropy(logits_parallel, target)     # [...] per-token, autograd
    p = vocab_parallel_target_prob(logits_parallel, target)          # [...] p(target), no_grad
    logp = vocab_parallel_target_logprob(logits_parallel, target)    # [...] log p(target), no_grad
    p = chunked_target_prob(hidden, weight_parallel, target, chunk_rows=4096)   # no [n, V] logits

``logits_parallel`` is ``[..., V/tp]`` with TP rank r holding vocab rows ``[r·V/tp, (r+1)·V/tp)``
(what a ``ColumnParallelLinear`` LM head with ``gather_output=False`` returns); ``target`` holds
global vocab ids. Everything is computed in fp32 with the max subtracted across TP ranks. At TP = 1
there is no communication and the results equal ``F.cross_entropy`` / ``softmax``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_alcot.parallel import parallel_state
from megatron_alcot.parallel.tensor_parallel import gemm, mappings
from megatron_alcot.parallel.tensor_parallel.utils import vocab_range

LOG2E = 1.4426950408889634   # exp(x) = exp2(x·log2 e); torch's CPU exp2 is ~3x faster than its exp


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(t, op=op, group=parallel_state.get_tensor_model_parallel_group())
    return t


def _local_target(target: torch.Tensor, per_partition: int):
    """(index into this rank's vocab slice, mask of targets owned by another rank)."""
    start, end = vocab_range(per_partition, parallel_state.get_tensor_model_parallel_rank())
    target = target.long()
    outside = (target < start) | (target >= end)
    return (target - start).masked_fill(outside, 0), outside


def _target_logit(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Global logit of the target, gathered from whichever rank owns it."""
    local, outside = _local_target(target, logits.shape[-1])
    picked = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
    return _all_reduce(picked)


def _global_max(logits: torch.Tensor) -> torch.Tensor:
    return _all_reduce(logits.max(dim=-1).values, op=dist.ReduceOp.MAX)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_parallel, target, label_smoothing):
        logits = logits_parallel.float() - _global_max(logits_parallel.float()).unsqueeze(-1)
        predicted = _target_logit(logits, target)
        exp = logits.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1))
        log_z = sum_exp.log()
        loss = log_z - predicted
        vocab = logits.shape[-1] * parallel_state.get_tensor_model_parallel_world_size()
        if label_smoothing > 0:
            # F.cross_entropy's smoothing: (1-e)·nll + e·mean_j(-log p_j) over the whole vocab.
            mean_logit = _all_reduce(logits.sum(dim=-1)) / vocab
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_z - mean_logit)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        local, outside = _local_target(target, logits.shape[-1])
        ctx.save_for_backward(softmax, local, outside)
        ctx.label_smoothing, ctx.vocab, ctx.dtype = label_smoothing, vocab, logits_parallel.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax.clone()
        eps = ctx.label_smoothing
        hit = (~outside).to(grad.dtype) * (1.0 - eps)
        grad.scatter_add_(-1, local.unsqueeze(-1), -hit.unsqueeze(-1))
        if eps > 0:
            grad.sub_(eps / ctx.vocab)
        grad.mul_(grad_loss.float().unsqueeze(-1))
        return grad.to(ctx.dtype), None, None


def vocab_parallel_cross_entropy(logits_parallel: torch.Tensor, target: torch.Tensor,
                                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token CE ``[...]`` (fp32) of vocab-parallel logits ``[..., V/tp]``; differentiable."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    return _VocabParallelCrossEntropy.apply(logits_parallel, target, float(label_smoothing))


@torch.no_grad()
def vocab_parallel_target_logprob(logits_parallel: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` ``[...]`` in fp32, without an autograd graph."""
    logits = logits_parallel.float()
    logits = logits - _global_max(logits).unsqueeze(-1)
    log_z = _all_reduce(logits.exp().sum(dim=-1)).log()
    return _target_logit(logits, target) - log_z


@torch.no_grad()
def vocab_parallel_target_prob(logits_parallel: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``p(target)`` ``[...]`` in fp32, without an autograd graph."""
    return vocab_parallel_target_logprob(logits_parallel, target).exp()


# fp32 logits of one no-grad target-probability chunk, by device: 4096 rows of a 4k vocabulary on
# CPUs (the size measured fastest for small vocabularies; 333 rows at V = 50304 instead of 824 MB),
# and enough rows on GPUs that the LM-head weight is read a few times per micro-batch.
TARGET_PROB_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}


def target_prob_chunk_rows(device, vocab_per_rank: int) -> int:
    """Rows per chunk of :func:`chunked_target_logprob` on ``device`` (``torch.device`` or its type;
    accelerators other than CPU are sized like CUDA)."""
    kind = device if isinstance(device, str) else device.type
    budget = TARGET_PROB_CHUNK_BYTES["cpu" if kind == "cpu" else "cuda"]
    return max(32, budget // (4 * max(1, vocab_per_rank)))


@torch.no_grad()
def chunked_target_logprob(hidden: torch.Tensor, weight_parallel: torch.Tensor, target: torch.Tensor,
                           chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None,
                           vocab_size: Optional[int] = None, gemm_backend: Union[str, gemm.GemmLibrary] = "auto") -> torch.Tensor:
    """``log p(target)`` for ``logits = hidden @ weight_parallel.T`` without materialising them.

    ``hidden [n, h]`` (or ``[..., h]``, flattened) must be identical on every TP rank,
    ``weight_parallel [V/tp, h]`` is this rank's LM-head shard, ``target [n]`` global ids.
    Rows are processed ``chunk_rows`` at a time (default: sized by device,
    :func:`target_prob_chunk_rows`), and within a row chunk the local vocabulary
    ``chunk_vocab`` rows at a time with a running max / sum-exp, so peak extra memory is
    ``chunk_rows x min(chunk_vocab, V/tp)`` fp32. Three small all-reduces per row chunk.
    ``vocab_size`` (the true vocabulary) excludes the padding rows of the weight from the
    normaliser, exactly as :data:`PADDED_LOGIT` does in the model's LM head. With oneDNN GEMMs
    (``gemm_backend``, see ``gemm.py``) a chunk's rows are padded to ``gemm.bucket_rows``, since the
    row count changes from call to call.
    Returns fp32 ``[n]`` (shaped like ``target``).
    """
    shape = target.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target = target.reshape(-1)
    if hidden.shape[0] != target.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but target has {target.shape[0]}")
    per_partition = weight_parallel.shape[0]
    chunk_vocab = chunk_vocab or per_partition
    chunk_rows = chunk_rows or target_prob_chunk_rows(hidden.device, per_partition)
    local_target, outside = _local_target(target, per_partition)
    out = torch.empty(target.shape[0], dtype=torch.float32, device=hidden.device)
    backend = gemm.resolve_gemm_backend(gemm_backend, hidden, weight_parallel)
    for r0 in range(0, hidden.shape[0], chunk_rows):
        h = hidden[r0:r0 + chunk_rows]
        rows = h.shape[0]
        if backend == "onednn":
            h = F.pad(h, (0, 0, 0, gemm.bucket_rows(rows) - rows))
        run_max = torch.full((rows,), float("-inf"), device=h.device)
        run_sum = torch.zeros(rows, device=h.device)
        tgt = torch.zeros(rows, device=h.device)
        lt, out_mask = local_target[r0:r0 + rows], outside[r0:r0 + rows]
        for v0 in range(0, per_partition, chunk_vocab):
            logits = gemm.matmul_nt(h, weight_parallel[v0:v0 + chunk_vocab], backend)[:rows].float()
            if vocab_size is not None:
                logits = mask_padded_vocab(logits, vocab_size, per_partition, v0)
            new_max = torch.maximum(run_max, logits.amax(dim=-1))
            shifted = logits.sub(new_max.unsqueeze(-1)).mul_(LOG2E)
            run_sum = run_sum * (run_max - new_max).exp() + shifted.exp2_().sum(-1)
            run_max = new_max
            here = (~out_mask) & (lt >= v0) & (lt < v0 + logits.shape[-1])
            idx = (lt - v0).clamp(0, logits.shape[-1] - 1)
            tgt += logits.gather(-1, idx.unsqueeze(-1)).squeeze(-1).masked_fill(~here, 0.0)
        global_max = _all_reduce(run_max.clone(), op=dist.ReduceOp.MAX)
        log_z = _all_reduce(run_sum * (run_max - global_max).exp()).log() + global_max
        out[r0:r0 + rows] = _all_reduce(tgt) - log_z
    return out.reshape(shape)


@torch.no_grad()
def chunked_target_prob(hidden: torch.Tensor, weight_parallel: torch.Tensor, target: torch.Tensor,
                        chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None,
                        vocab_size: Optional[int] = None, gemm_backend: Union[str, gemm.GemmLibrary] = "auto") -> torch.Tensor:
    """``p(target)`` fp32 ``[n]``; see :func:`chunked_target_logprob`."""
    return chunked_target_logprob(hidden, weight_parallel, target, chunk_rows, chunk_vocab,
                                  vocab_size, gemm_backend).exp()


def vocab_parallel_log_softmax(logits_parallel: torch.Tensor) -> torch.Tensor:
    """This rank's slice ``[..., V/tp]`` of the log-softmax over the full vocabulary (fp32,
    differentiable: the normaliser's gradient reaches every rank's slice)."""
    logits = logits_parallel.float()
    with torch.no_grad():
        m = _global_max(logits).unsqueeze(-1)
    sum_exp = mappings.reduce_from_tensor_model_parallel_region(
        mappings.copy_to_tensor_model_parallel_region((logits - m).exp().sum(-1, keepdim=True)))
    return logits - m - sum_exp.log()


# Finite rather than -inf: a TP rank whose slice is all padding must not produce inf - inf.
PADDED_LOGIT = -30000.0


def mask_padded_vocab(logits_parallel: torch.Tensor, vocab_size: int,
                      per_partition: Optional[int] = None, offset: int = 0) -> torch.Tensor:
    """Set the logits of vocabulary-padding columns (global id >= ``vocab_size``) to
    :data:`PADDED_LOGIT`, so the padding (whose size depends on the TP size) takes no softmax mass
    and a model gives the same probabilities at any TP size and after export without padding.

    ``logits_parallel [..., c]`` holds this rank's columns ``offset .. offset+c`` of its
    ``per_partition``-wide slice (default: the whole slice). Returns the input when no column is
    padding.
    """
    cols = logits_parallel.shape[-1]
    per_partition = per_partition or cols
    start, _ = vocab_range(per_partition, parallel_state.get_tensor_model_parallel_rank())
    first_pad = vocab_size - start - offset
    if first_pad >= cols:
        return logits_parallel
    pad = torch.arange(cols, device=logits_parallel.device) >= max(first_pad, 0)
    return logits_parallel.masked_fill(pad, PADDED_LOGIT)
