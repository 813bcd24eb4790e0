"""Pipeline parallelism with latent laps against the single-process model: stage weights, losses,
ℓ_t, every parameter's gradient, skipped laps of halted micro-batches, uneven splits, PP x TP, the
1F1B and GPipe orders and the bound on micro-batches alive per stage."""
import contextlib
import io

import pytest
import torch

from dist_utils import run_distributed
from megatron_alcot.config import ConfigError, ParallelConfig
from megatron_alcot.model import build_model
from megatron_alcot.model.presets import preset
from megatron_alcot.parallel import parallel_state
from megatron_alcot.model.pipeline_split import build_pipeline_stage, layer_ranges
from megatron_alcot.optim.tied_embedding import allreduce_tied_embedding_grads
from megatron_alcot.training.pipeline_schedule import (ScheduleStats, forward_backward_pipelining_with_laps,
                                                       infos_from_last_stage, max_in_flight_microbatches)

B, S, SEED, MICRO = 2, 8, 77, 3


def _cfg(method="alcot", **kw):
    base = dict(latent_method=method, latent_max_steps=3, seq_length=S, latent_threshold=0.2,
                num_layers=4)
    base.update(kw)
    return preset("tiny", **base)


def _batches(seed=0, n=MICRO):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append({"tokens": torch.randint(0, 256, (B, S), generator=g),
                    "labels": torch.randint(0, 256, (B, S), generator=g),
                    "loss_mask": (torch.rand(B, S, generator=g) > 0.25).float()})
    return out


def routers_random(model, std=0.15, seed=0):
    """Random router weights, so that learned halting gives a mixture of depths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in getattr(model.latent, "routers", []):
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * std)
            r.bias.fill_(0.5)


def halt_after_lap1(k, reach_next, active):
    """Every token stops after lap 1: the micro-batch is all halted with laps 2.. left."""
    return torch.full_like(active, k < 1)


def _reference(cfg, batches, halting):
    model = build_model(cfg, seed=SEED)
    routers_random(model)
    run_lap, calls = model.run_lap, []

    def counting_run_lap(*args, **kwargs):
        calls.append(1)
        return run_lap(*args, **kwargs)

    model.run_lap = counting_run_lap
    losses, steps, laps = [], [], []
    for i, batch in enumerate(batches):
        h = halting[i] if isinstance(halting, list) else halting
        calls.clear()
        out = model(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"], halting=h)
        (out.loss / len(batches)).backward()
        losses.append(out.loss.detach())
        steps.append(out.num_steps)
        laps.append(len(calls))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": losses, "num_steps": steps, "laps": laps, "grads": grads}


def _full_grad(param):
    """The TP = 1 gradient of a (possibly TP-sharded) parameter."""
    grad = param.grad if param.grad is not None else torch.zeros_like(param)
    if parallel_state.get_tensor_model_parallel_world_size() > 1 and getattr(param, "tensor_model_parallel", False):
        from tp_helpers import merged
        return merged(grad, param.partition_dim, param.partition_stride)
    return grad.clone()


def _pipeline_body(rank, world_size, cases):
    results = []
    for case in cases:
        tp, pp = case.get("tp", 1), case["pp"]
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        pcfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        stage = build_pipeline_stage(case["cfg"], pcfg, seed=SEED, layer_split=case.get("split"))
        if stage.post_process:
            routers_random(stage)
        trace, step, model, stats = [], None, stage, ScheduleStats()
        no_sync = contextlib.nullcontext
        if case.get("trainer_step"):
            from megatron_alcot.training.ddp import DistributedDataParallel
            from megatron_alcot.training.train_step import make_forward_step
            step = make_forward_step(case["cfg"], torch.device("cpu"), None)
            model = DistributedDataParallel(stage, parallel_state.get_data_parallel_group())
            no_sync = model.no_sync
        infos = forward_backward_pipelining_with_laps(
            forward_step_func=step,
            data_iterator=iter(case["batches"]), model=stage, num_microbatches=len(case["batches"]),
            halting=case["halting"], lap_trace=trace, forward_only=case.get("forward_only", False),
            max_in_flight=case.get("max_in_flight"), order=case.get("order", "1f1b"), stats=stats,
            no_sync=no_sync)
        allreduce_tied_embedding_grads(stage)
        if case.get("trainer_step"):
            model.finish_grad_sync()
            numel = 6 + case["cfg"].max_latent_steps + 1
            infos = infos_from_last_stage(infos, numel)
        grads = {}
        for name, p in stage.named_parameters():
            if getattr(p, "shared_embedding", False):
                name = "embedding.word_embeddings.weight"
            grads[name] = _full_grad(p)
        results.append({"pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
                        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
                        "infos": infos, "trace": trace, "grads": grads,
                        "max_in_flight": stats.max_in_flight,
                        "has_grad": any(p.grad is not None for p in stage.parameters())})
    # As bytes: many tensors shared through file descriptors can outlive a finished child.
    buffer = io.BytesIO()
    torch.save(results, buffer)
    return buffer.getvalue()


def _check(payloads, cases):
    results_by_rank = [torch.load(io.BytesIO(b), weights_only=True) for b in payloads]
    for c, case in enumerate(cases):
        pp = case["pp"]
        ref = _reference(case["cfg"], case["batches"], case["halting"])
        seen = set()
        for rank_results in results_by_rank:
            got = rank_results[c]
            name = case["name"]
            expected_laps = [(m, k) for m in range(len(case["batches"])) for k in range(ref["laps"][m])]
            assert sorted(got["trace"]) == expected_laps, (name, got["pp_rank"])
            if not case.get("forward_only"):
                bound = max_in_flight_microbatches(pp, got["pp_rank"], len(case["batches"]),
                                                   case.get("max_in_flight"), case.get("order", "1f1b"))
                assert 1 <= got["max_in_flight"] <= bound, (name, got["pp_rank"], got["max_in_flight"])
                if case.get("order") == "gpipe" and got["pp_rank"] == 0:
                    assert got["max_in_flight"] == len(case["batches"])     # GPipe holds them all
            if case.get("trainer_step"):
                # The trainer's step function: [loss, lm, latent, 1, tokens, flops, depth counts...],
                # summed over micro-batches and sent to every stage.
                (total,) = got["infos"]
                torch.testing.assert_close(total[0], torch.stack(ref["loss"]).sum().double())
                assert int(total[3]) == len(case["batches"])
                depth = torch.bincount(torch.cat([n.reshape(-1) for n in ref["num_steps"]]),
                                       minlength=case["cfg"].max_latent_steps + 1)
                assert torch.equal(total[6:].long(), depth)
            elif got["pp_rank"] == pp - 1:
                for m, info in enumerate(got["infos"]):
                    torch.testing.assert_close(info["loss"], ref["loss"][m], atol=1e-6, rtol=1e-6)
                    assert torch.equal(info["num_steps"], ref["num_steps"][m]), (name, m)
            else:
                assert got["infos"] == []
            if case.get("forward_only"):
                assert not got["has_grad"], name
                continue
            for pname, g in got["grads"].items():
                e = ref["grads"].get(pname, torch.zeros_like(g))
                scale = e.abs().max().clamp_min(1e-6)
                assert float((g - e).abs().max() / scale) < 3e-5, (name, pname)
                seen.add(pname)
        if not case.get("forward_only"):
            assert set(ref["grads"]) <= seen, (case["name"], set(ref["grads"]) - seen)


def _pp2_cases():
    cases = [
        {"name": "alcot-learned-mixed-tied", "cfg": _cfg(untie_embeddings_and_output_weights=False),
         "batches": _batches(0), "halting": ["learned", halt_after_lap1, "never"]},
        {"name": "alcot-learned-split-1-3-trainer-step", "cfg": _cfg(), "split": "1,3", "trainer_step": True,
         "batches": _batches(1), "halting": "learned"},
        {"name": "alcot-never", "cfg": _cfg(latent_max_steps=2), "batches": _batches(2, 2),
         "halting": "never"},
        {"name": "vanilla", "cfg": _cfg("vanilla"), "batches": _batches(3), "halting": "learned"},
        {"name": "loop", "cfg": _cfg("loop", latent_max_steps=2), "split": "3,1",
         "batches": _batches(4, 2), "halting": "learned"},
        {"name": "pause", "cfg": _cfg("pause", latent_max_steps=2), "batches": _batches(5, 2),
         "halting": "learned"},
        {"name": "alcot-forward-only", "cfg": _cfg(), "batches": _batches(6), "halting": "learned",
         "forward_only": True},
        {"name": "alcot-gpipe-order", "cfg": _cfg(), "batches": _batches(9, 4), "order": "gpipe",
         "halting": [halt_after_lap1, "learned", "never", "learned"]},
        {"name": "alcot-one-in-flight", "cfg": _cfg(), "batches": _batches(10), "max_in_flight": 1,
         "halting": ["never", halt_after_lap1, "learned"]},
    ]
    for case in cases:
        case["pp"] = 2
    return cases


@pytest.mark.slow
def test_pp2_matches_single_process():
    """PP = 2: same losses, ℓ_t and gradients as PP = 1 for ALCoT (learned with mixed depths, a
    micro-batch halted after step 1, never), vanilla, loop and pause; tied and untied embeddings;
    even and uneven splits; GPipe order and one micro-batch in flight; the halted micro-batch runs
    no lap past step 1 on any stage."""
    cases = _pp2_cases()
    _check(run_distributed(_pipeline_body, 2, cases), cases)


@pytest.mark.slow
def test_pp4_uneven_and_pp2_tp2():
    """Four stages with an uneven split, 3 of 4 micro-batches in flight; 1F1B with 6 micro-batches
    of uneven depths on 4 stages, at most 4 alive; PP = 2 x TP = 2."""
    cases = [{"name": "pp4-uneven", "pp": 4,
              "cfg": _cfg(num_layers=5, untie_embeddings_and_output_weights=False),
              "split": "2,1,1,1", "batches": _batches(7, 4), "max_in_flight": 3,
              "halting": ["learned", halt_after_lap1, "learned", "always"]},
             {"name": "pp4-1f1b-4-alive-of-6", "pp": 4, "cfg": _cfg(), "max_in_flight": 4,
              "batches": _batches(11, 6),
              "halting": ["never", halt_after_lap1, "learned", "always", "learned", halt_after_lap1]},
             {"name": "pp2-tp2", "pp": 2, "tp": 2, "cfg": _cfg(untie_embeddings_and_output_weights=False),
              "batches": _batches(8), "halting": "learned"}]
    _check(run_distributed(_pipeline_body, 4, cases), cases)


# --- single process --------------------------------------------------------------------------------
def test_layer_ranges():
    assert layer_ranges(8, 2) == [(0, 4), (4, 8)]
    assert layer_ranges(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert layer_ranges(8, 2, "3,5") == [(0, 3), (3, 8)]
    assert layer_ranges(8, 2, [5, 3]) == [(0, 5), (5, 8)]
    for bad in ("3,4", "8,0", "1,2,5", "a,b"):
        with pytest.raises(ConfigError, match="pipeline-layer-split"):
            layer_ranges(8, 2, bad)
    with pytest.raises(ConfigError, match="num-layers"):
        layer_ranges(2, 3)


@pytest.mark.parametrize("split,pp", [(None, 2), ("1,3", 2), ("3,1", 2), ("1,1,2", 3)])
def test_stages_hold_the_single_process_weights(split, pp):
    cfg = _cfg(untie_embeddings_and_output_weights=False)
    whole = dict(build_model(cfg, seed=SEED).named_parameters())
    names = set()
    for rank in range(pp):
        stage = build_pipeline_stage(cfg, seed=SEED, layer_split=split, pipeline_rank=rank,
                                     pipeline_size=pp)
        assert stage.pre_process == (rank == 0) and stage.post_process == (rank == pp - 1)
        for name, p in stage.named_parameters():
            if getattr(p, "shared_embedding", False):
                assert torch.equal(p, whole["embedding.word_embeddings.weight"])
                continue
            assert torch.equal(p, whole[name]), name
            assert name not in names
            names.add(name)
    assert names == set(whole)


def test_ponder_with_pipeline_is_refused():
    with pytest.raises(NotImplementedError, match="ponder"):
        build_pipeline_stage(_cfg("ponder"), pipeline_rank=0, pipeline_size=2)


def test_max_in_flight_microbatches():
    assert max_in_flight_microbatches(4, 0, 32) == 8
    assert max_in_flight_microbatches(4, 3, 32) == 8
    assert max_in_flight_microbatches(4, 2, 3) == 3
    assert max_in_flight_microbatches(4, 1, 32, limit=6) == 6
    assert max_in_flight_microbatches(2, 1, 32, order="gpipe") == 32
    with pytest.raises(ValueError, match="pipeline order"):
        max_in_flight_microbatches(2, 0, 4, order="interleaved")


def test_pipeline_flags_are_validated():
    with pytest.raises(ConfigError, match="--pipeline-schedule"):
        ParallelConfig(pipeline_schedule="zb").validate(1)
    with pytest.raises(ConfigError, match="--pipeline-max-in-flight"):
        ParallelConfig(pipeline_max_in_flight=0).validate(1)
    with pytest.raises(ConfigError, match="virtual-pipeline"):
        ParallelConfig(num_layers_per_virtual_pipeline_stage=2).validate(1)
