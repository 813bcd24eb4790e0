"""Megatron-style tensor-parallel layers: column/row-parallel linear and vocab-parallel embedding.

    fc1 = ColumnParallelLinear(h, 2 * ffn, init_method=init, stride=2)     # [gate_r; up_r] per rank
    fc2 = RowParallelLinear(ffn, h, init_method=out_init)                  # input_is_parallel=True
    y = fc2(act(fc1(x)))                                                   # x, y replicated [b, s, h]
    emb = VocabParallelEmbedding(padded_vocab, h, init_method=init)        # out replicated [b, s, h]
    head = ColumnParallelLinear(h, padded_vocab, init_method=init)         # logits [b, s, V/tp]
    logits = parallel_lm_logits(hidden, emb.weight)                        # tied head, [b, s, V/tp]

Weights are ``[out_per_rank, in]`` (column, embedding) or ``[out, in_per_rank]`` (row) and carry
``tensor_model_parallel``, ``partition_dim`` and ``partition_stride``. Initialisation draws the FULL
(TP = 1) weight in fp32 on the CPU from the default generator, which ``random.model_parallel_seed``
sets identically on every TP rank, then keeps this rank's shard (``sharding.shard_tensor``): a TP = k
model built after ``model_parallel_seed(S)`` holds exactly the shards of the TP = 1 model built
after ``model_parallel_seed(S)``, whatever the device. Biases start at zero.

Sequence parallel (``sequence_parallel=True``): the input of a column-parallel linear and the output
of a row-parallel linear / embedding are split along ``sequence_dim`` (default 0, token rows of
``[n, h]``; use 1 for ``[b, s, h]``). The column layer all-gathers its input rows before the matmul,
the row layer and the embedding reduce-scatter their output rows.

``gemm_backend`` (``--cpu-gemm-backend``, or a ``gemm.GemmLibrary`` already resolved) is the library of
the local fp32 CPU matmul; the layer resolves it on this machine when built, not per call.

Every parameter gradient is complete after ``backward`` (the replicated row-parallel bias is
all-reduced over TP inside the layer under sequence parallelism), so only the usual data-parallel
reduction remains.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from megatron_alcot.parallel import parallel_state
from megatron_alcot.parallel.tensor_parallel import gemm, mappings
from megatron_alcot.parallel.tensor_parallel.sharding import shard_tensor
from megatron_alcot.parallel.tensor_parallel.utils import (divide, init_method_normal,
                                                           set_tensor_model_parallel_attributes,
                                                           vocab_range)

_DEFAULT_STD = 0.02


def _init_shard(shape_full, partition_dim: int, stride: int, init_method: Optional[Callable],
                dtype, device) -> nn.Parameter:
    """Draw the full weight, keep this TP rank's shard, and tag it as TP-partitioned."""
    init_method = init_method or init_method_normal(_DEFAULT_STD)
    full = torch.empty(shape_full, dtype=torch.float32)
    with torch.no_grad():
        init_method(full)
    shard = shard_tensor(full, partition_dim, stride, parallel_state.get_tensor_model_parallel_rank(),
                         parallel_state.get_tensor_model_parallel_world_size())
    param = nn.Parameter(shard.to(device=device, dtype=dtype))
    set_tensor_model_parallel_attributes(param, True, partition_dim, stride)
    return param


def _zeros(n: int, dtype, device, parallel: bool, stride: int = 1) -> nn.Parameter:
    param = nn.Parameter(torch.zeros(n, dtype=dtype, device=device))
    set_tensor_model_parallel_attributes(param, parallel, 0, stride)
    return param


class ColumnParallelLinear(nn.Module):
    """``y = x A^T + b`` with A split along its output dim: rank r holds rows ``[out/tp, in]``.

    Input ``[..., in]`` replicated (or, with ``sequence_parallel``, split along ``sequence_dim``);
    output ``[..., out/tp]``, or ``[..., out]`` replicated with ``gather_output=True``.
    ``stride=2`` is the fused ``[gate; up]`` layout (each rank holds ``[gate_r; up_r]``).
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False,
                 gather_output: bool = False, init_method: Optional[Callable] = None,
                 stride: int = 1, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, sequence_dim: int = 0, device=None,
                 gemm_backend: Union[str, gemm.GemmLibrary] = "auto"):
        super().__init__()
        world = parallel_state.get_tensor_model_parallel_world_size()
        if gather_output and stride > 1 and world > 1:
            raise ValueError("gather_output=True with stride > 1 would return the rank-major "
                             "[gate_0; up_0; gate_1; ...] layout; gather outside the layer instead")
        if gather_output and sequence_parallel:
            raise ValueError("gather_output=True cannot be combined with sequence_parallel=True")
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, world * stride, "output size") * stride
        self.gather_output, self.stride = gather_output, stride
        self.gemm = gemm.gemm_library(gemm_backend)
        self.sequence_parallel, self.sequence_dim = sequence_parallel, sequence_dim
        self.weight = _init_shard((output_size, input_size), 0, stride, init_method, params_dtype, device)
        self.bias = _zeros(self.output_size_per_partition, params_dtype, device, True, stride) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_parallel_region(x, self.sequence_dim, True)
        else:
            x = mappings.copy_to_tensor_model_parallel_region(x)
        y = self.gemm.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = mappings.gather_from_tensor_model_parallel_region(y)
        return y

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size} ({self.output_size_per_partition}/rank), "
                f"bias={self.bias is not None}, stride={self.stride}, gather_output={self.gather_output}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """``y = x A^T + b`` with A split along its input dim: rank r holds columns ``[out, in/tp]``.

    Input ``[..., in/tp]`` (``input_is_parallel=True``) or ``[..., in]`` replicated; output
    ``[..., out]`` replicated (summed over TP), or split along ``sequence_dim`` with
    ``sequence_parallel``. The bias is replicated and added after the reduction.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False,
                 input_is_parallel: bool = True, init_method: Optional[Callable] = None,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 sequence_dim: int = 0, device=None, gemm_backend: Union[str, gemm.GemmLibrary] = "auto"):
        super().__init__()
        world = parallel_state.get_tensor_model_parallel_world_size()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel=True needs input_is_parallel=True")
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, world, "input size")
        self.input_is_parallel = input_is_parallel
        self.gemm = gemm.gemm_library(gemm_backend)
        self.sequence_parallel, self.sequence_dim = sequence_parallel, sequence_dim
        self.weight = _init_shard((output_size, input_size), 1, 1, init_method, params_dtype, device)
        self.bias = _zeros(output_size, params_dtype, device, False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = mappings.scatter_to_tensor_model_parallel_region(x)
        y = self.gemm.linear(x, self.weight, None)
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y, self.sequence_dim)
        else:
            y = mappings.reduce_from_tensor_model_parallel_region(y)
        if self.bias is not None:
            bias = self.bias
            if self.sequence_parallel:
                # Each rank sees only its rows, so the bias gradient is partial: sum it over TP.
                bias = mappings.copy_to_tensor_model_parallel_region(bias)
            y = y + bias
        return y

    def extra_repr(self) -> str:
        return (f"in={self.input_size} ({self.input_size_per_partition}/rank), out={self.output_size}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the padded vocabulary) are split over TP ranks.

    ``ids [...]`` (replicated) -> ``[..., h]`` replicated, or split along ``sequence_dim`` of the
    output with ``sequence_parallel``. Ids outside this rank's ``[start, end)`` contribute zero and
    the all-reduce fills them in from the owning rank.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 init_method: Optional[Callable] = None, params_dtype: torch.dtype = torch.float32,
                 sequence_parallel: bool = False, sequence_dim: int = 0, device=None):
        super().__init__()
        world = parallel_state.get_tensor_model_parallel_world_size()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_per_partition = divide(num_embeddings, world, "vocabulary size")
        self.vocab_start_index, self.vocab_end_index = vocab_range(
            self.num_embeddings_per_partition, parallel_state.get_tensor_model_parallel_rank())
        self.sequence_parallel, self.sequence_dim = sequence_parallel, sequence_dim
        self.weight = _init_shard((num_embeddings, embedding_dim), 0, 1, init_method, params_dtype, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
        local = (ids - self.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(out, self.sequence_dim)
        return mappings.reduce_from_tensor_model_parallel_region(out)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} ({self.num_embeddings_per_partition}/rank), "
                f"{self.embedding_dim}, sequence_parallel={self.sequence_parallel}")


def parallel_lm_logits(hidden: torch.Tensor, weight_parallel: torch.Tensor, *,
                       sequence_parallel: bool = False, sequence_dim: int = 0) -> torch.Tensor:
    """Vocab-parallel logits ``[..., V/tp]`` from replicated ``hidden [..., h]`` and a vocab shard
    ``weight_parallel [V/tp, h]`` (e.g. a tied ``VocabParallelEmbedding.weight``); the same
    computation as a ``ColumnParallelLinear`` LM head with ``gather_output=False``."""
    if sequence_parallel:
        hidden = mappings.gather_from_sequence_parallel_region(hidden, sequence_dim, True)
    else:
        hidden = mappings.copy_to_tensor_model_parallel_region(hidden)
    return F.linear(hidden, weight_parallel)
