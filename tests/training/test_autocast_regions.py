"""One low-precision copy of each weight per step under autocast, however many micro-batches and
laps: the graphs of all of them hold the same bf16 copy (PP = 1 and the lap pipeline)."""
import contextlib
import io

import pytest
import torch

from dist_utils import run_distributed
from megatron_alcot.config import ParallelConfig
from megatron_alcot.model import build_model
from megatron_alcot.model.pipeline_split import build_pipeline_stage
from megatron_alcot.model.presets import preset
from megatron_alcot.parallel import parallel_state
from megatron_alcot.training.pipeline_schedule import (forward_backward_pipelining_with_laps,
                                                       weight_cast_region)
from megatron_alcot.training.schedules import forward_backward_no_pipelining
from megatron_alcot.training.train_step import autocast_context

B, S, MICRO = 2, 8, 3


def _cfg():
    return preset("tiny", latent_method="alcot", latent_max_steps=3, seq_length=S, num_layers=2,
                  latent_threshold=0.2, untie_embeddings_and_output_weights=True)


def _batches(n=MICRO):
    g = torch.Generator().manual_seed(0)
    return [{"tokens": torch.randint(0, 256, (B, S), generator=g),
             "labels": torch.randint(0, 256, (B, S), generator=g)} for _ in range(n)]


class _WeightCopies:
    """Records the distinct bf16 copies of each 2-D weight that autograd saves."""

    def __init__(self, model):
        self.weights = {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters() if p.dim() == 2}
        self.seen = {n: set() for n in self.weights}
        self.keep = []

    def pack(self, t):
        if t.dtype == torch.bfloat16 and t.dim() == 2:
            base = t if t.is_contiguous() else t.t()
            for name, w in self.weights.items():
                if base.shape == w.shape and torch.equal(base, w):
                    self.seen[name].add(t.untyped_storage().data_ptr())
                    self.keep.append(t)       # alive until the end: pointers are not reused
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def max_copies(self) -> int:
        return max(len(s) for s in self.seen.values())


def _step(batch, model):
    with autocast_context(torch.device("cpu"), torch.bfloat16):
        out = model(batch["tokens"], labels=batch["labels"], halting="never")
    return out.loss, None


@pytest.mark.parametrize("region", [True, False])
def test_pp1_one_weight_copy_per_iteration(region):
    model = build_model(_cfg(), seed=3)
    copies = _WeightCopies(model)
    ctx = weight_cast_region(torch.device("cpu"), torch.bfloat16) if region else contextlib.nullcontext()
    with copies.hooks(), ctx:
        forward_backward_no_pipelining(forward_step_func=_step, data_iterator=iter(_batches()),
                                       model=model, num_microbatches=MICRO)
    assert copies.max_copies() == (1 if region else MICRO)


def _pipeline_body(rank, world):
    torch.set_num_threads(1)
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    stage = build_pipeline_stage(_cfg(), ParallelConfig(pipeline_model_parallel_size=2), seed=3)
    copies = _WeightCopies(stage)
    with copies.hooks():
        forward_backward_pipelining_with_laps(data_iterator=iter(_batches()), model=stage,
                                              num_microbatches=MICRO, halting="never",
                                              autocast_dtype=torch.bfloat16)
    buffer = io.BytesIO()
    torch.save({"copies": copies.max_copies(), "grads": all(p.grad is not None for p in stage.parameters())},
               buffer)
    return buffer.getvalue()


@pytest.mark.slow
def test_lap_pipeline_one_weight_copy_per_iteration():
    """3 micro-batches x 4 laps on each of 2 stages: every lap's graph holds the same bf16 copy."""
    for payload in run_distributed(_pipeline_body, 2):
        got = torch.load(io.BytesIO(payload), weights_only=True)
        assert got["copies"] == 1 and got["grads"]
