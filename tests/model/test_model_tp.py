"""TP = 2 and TP = 4 (gloo, spawned) give the TP = 1 logits, loss, halting and gradients, for
vanilla and ALCoT, with and without sequence parallelism (compacted rows padded to a multiple of
TP), for the hidden and the probability readout."""
import io

import pytest
import torch
import torch.distributed as dist

from alcot_reference import routers_random
from dist_utils import run_distributed
from megatron_alcot.config import ParallelConfig
from megatron_alcot.model import build_model
from megatron_alcot.model.presets import preset
from megatron_alcot.parallel import parallel_state
from megatron_alcot.parallel.tensor_parallel import merge_shards

pytestmark = pytest.mark.slow

B, S = 2, 12
CASES = [("vanilla", "hidden", False), ("vanilla", "hidden", True), ("alcot", "hidden", False),
         ("alcot", "hidden", True), ("alcot", "prob", True)]


def _inputs():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 256, (B, S), generator=g)
    labels = torch.randint(0, 256, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.2).float()
    return tokens, labels, mask


def _gather_tp(t, dim):
    world = parallel_state.get_tensor_model_parallel_world_size()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim)


def _run_cases(tp):
    tokens, labels, mask = _inputs()
    results = {}
    for method, readout, sp in CASES:
        sp = sp and tp > 1
        cfg = preset("tiny-tp4", latent_method=method, latent_max_steps=3, seq_length=S,
                     latent_threshold=0.2, latent_readout=readout)
        model = build_model(cfg, ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp))
        routers_random(model)
        logits = _gather_tp(model(tokens).logits.detach(), -1)
        out = model(tokens, labels=labels, loss_mask=mask)
        out.loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                world = parallel_state.get_tensor_model_parallel_world_size()
                parts = [torch.empty_like(g) for _ in range(world)]
                dist.all_gather(parts, g.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
                g = merge_shards(parts, p.partition_dim, p.partition_stride)
            elif getattr(p, "sequence_parallel", False) and tp > 1:
                g = g.clone()
                dist.all_reduce(g, group=parallel_state.get_tensor_model_parallel_group())
            grads[name] = g
        results[(method, readout, sp and tp > 1)] = dict(logits=logits, loss=out.loss.detach(),
                                              num_steps=out.num_steps, grads=grads)
    return results


def _worker(rank, world_size):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    buf = io.BytesIO()   # plain bytes: tensors sent through the queue would live in the worker's shared memory
    torch.save(_run_cases(world_size), buf)
    return buf.getvalue()


def _compare(ref, got, tp):
    for (method, readout, sp), res in got.items():
        r = ref[(method, readout, False)]  # TP = 1 has no sequence parallelism
        what = f"tp={tp} {method}/{readout} sp={sp}"
        assert torch.equal(res["num_steps"], r["num_steps"]), what
        if method == "alcot":
            assert len(r["num_steps"].unique()) >= 2, what
        torch.testing.assert_close(res["logits"], r["logits"], atol=2e-5, rtol=1e-5, msg=what)
        torch.testing.assert_close(res["loss"], r["loss"], atol=1e-6, rtol=1e-5, msg=what)
        for name, g in r["grads"].items():
            scale = g.abs().max().clamp_min(1e-6)
            err = ((res["grads"][name] - g).abs().max() / scale).item()
            # A router bias gradient is one sum over every token and step; the probability readout
            # differentiates through log-sum-exps, so its summation-order noise is a bit larger.
            tol = 1e-4 if "routers" in name else 2e-5
            assert err < tol, f"{what} grad {name}: rel err {err:.2e}"


def test_tensor_parallel_matches_single_process():
    ref = _run_cases(1)
    for tp in (2, 4):
        results = [torch.load(io.BytesIO(r), weights_only=True) for r in run_distributed(_worker, tp)]
        _compare(ref, results[0], tp)
        for other in results[1:]:   # every TP rank holds the same replicated results
            assert torch.equal(other[("alcot", "hidden", True)]["logits"],
                               results[0][("alcot", "hidden", True)]["logits"])
