"""A tiny TP-sharded stand-in with Megatron parameter names, for checkpoint tests.

    model = StandIn(vocab_size=1000, hidden=32, ffn=64, num_layers=2, divisible_by=96)
    logits = model(tokens)          # [b, s, padded_vocab], gathered over TP
    StandIn(..., pp_stage=(1, 2))   # second of two pipeline stages: layer 1 (local 0), norm, head

Uses the real tensor-parallel layers, so shards carry partition_dim / partition_stride.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_alcot.parallel import parallel_state
from megatron_alcot.parallel.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                            VocabParallelEmbedding)
from megatron_alcot.parallel.tensor_parallel.utils import init_method_normal


def padded_vocab(vocab_size: int, divisible_by: int, tp: int) -> int:
    m = divisible_by * tp
    return int(math.ceil(vocab_size / m) * m)


class Norm(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden) + 0.01 * torch.randn(hidden))

    def forward(self, x):
        return F.rms_norm(x, x.shape[-1:], self.weight, 1e-5)


class MLP(nn.Module):
    def __init__(self, hidden, ffn):
        super().__init__()
        init = init_method_normal(0.05)
        self.linear_fc1 = ColumnParallelLinear(hidden, 2 * ffn, init_method=init, stride=2)
        self.linear_fc2 = RowParallelLinear(ffn, hidden, init_method=init)

    def forward(self, x):
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, hidden, ffn):
        super().__init__()
        self.input_layernorm = Norm(hidden)
        self.mlp = MLP(hidden, ffn)

    def forward(self, x):
        return x + self.mlp(self.input_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, hidden, ffn, n_local, last):
        super().__init__()
        self.layers = nn.ModuleList(Layer(hidden, ffn) for _ in range(n_local))
        if last:
            self.final_layernorm = Norm(hidden)


class Embedding(nn.Module):
    def __init__(self, padded, hidden):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(padded, hidden, init_method=init_method_normal(0.5))


class StandIn(nn.Module):
    def __init__(self, vocab_size=1000, hidden=32, ffn=64, num_layers=2, divisible_by=96,
                 pp_stage=(0, 1)):
        super().__init__()
        stage, stages = pp_stage
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.padded = padded_vocab(vocab_size, divisible_by, tp)
        self.first, self.last = stage == 0, stage == stages - 1
        n_local = num_layers // stages
        self.layer_offset = stage * n_local
        if self.first:
            self.embedding = Embedding(self.padded, hidden)
        self.decoder = Decoder(hidden, ffn, n_local, self.last)
        if self.last:
            self.output_layer = ColumnParallelLinear(hidden, self.padded, gather_output=True,
                                                     init_method=init_method_normal(0.05))

    def forward(self, x):
        if self.first:
            x = self.embedding.word_embeddings(x)
        for layer in self.decoder.layers:
            x = layer(x)
        if self.last:
            x = self.output_layer(self.decoder.final_layernorm(x))
        return x


def config_dict(vocab_size=1000, hidden=32, ffn=64, num_layers=2, divisible_by=96):
    return {"model": {"vocab_size": vocab_size, "hidden_size": hidden, "ffn_hidden_size": ffn,
                      "num_layers": num_layers, "make_vocab_size_divisible_by": divisible_by}}
