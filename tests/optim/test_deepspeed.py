"""DeepSpeed ZeRO-1/2/3 with the client AdamW at DP = 2 equals single-process AdamW on the full batch.

The first run builds DeepSpeed's shm_comm op (about 25 s, cached under TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions). Workers end with barrier, destroy_process_group and os._exit(0):
ZeRO-3 on CPU can otherwise abort at interpreter exit after finishing.
"""
import io

import pytest
import torch

from dist_utils import run_distributed_hard_exit
from megatron_alcot.config import OptimizerConfig
from megatron_alcot.model.presets import preset
from megatron_alcot.optim import OptimizerParamScheduler, build_optimizer
from megatron_alcot.optim.deepspeed_glue import build_deepspeed_config, initialize_deepspeed

STEPS, BATCH, SEQ, VOCAB = 3, 4, 16, 256
OPTIM = OptimizerConfig(lr=1e-2, min_lr=1e-3, weight_decay=0.1, clip_grad=0.3)


def _cfg():
    return preset("tiny", seq_length=SEQ, latent_method="vanilla")


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
             torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)) for _ in range(STEPS)]


def _sched(opt):
    return OptimizerParamScheduler(opt, max_lr=OPTIM.lr, min_lr=OPTIM.min_lr, warmup_iters=2,
                                   decay_iters=6, decay_style="cosine")


class _LossOnly(torch.nn.Module):
    """ZeRO-3 hooks find tensors in a module's outputs, not in our ModelOutput dataclass."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, labels):
        return self.model(tokens, labels=labels).loss


class _Mlp(torch.nn.Module):
    """Token MLP: the glue on a plain module (the LLaMA/ALCoT model through the trainer, ZeRO-3
    via ``Zero3Root`` included, is tests/training/test_deepspeed_training.py)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Embedding(VOCAB, 32)
        self.fc1, self.fc2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, VOCAB)
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, tokens, labels):
        h = self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(self.embed(tokens)))))
        return torch.nn.functional.cross_entropy(h.flatten(0, 1), labels.flatten())


def _model(stage):  # noqa: ARG001 - every stage runs the MLP, see _Mlp
    return _Mlp()


def _ds_body(rank, world, stages):
    import deepspeed
    results = {}
    for stage in stages:
        model = _model(stage)
        engine, opt = initialize_deepspeed(
            model, None, {"steps_per_print": 10 ** 9, "wall_clock_breakdown": False},
            lr=OPTIM.lr, weight_decay=OPTIM.weight_decay, clip_grad=OPTIM.clip_grad,
            micro_batch_size=BATCH // world, global_batch_size=BATCH, zero_stage=stage)
        sched = _sched(opt)
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        for tokens, labels in _batches():
            loss = engine(tokens[rows], labels[rows])
            engine.backward(loss)
            engine.step()
            sched.step()
        if stage == 3:
            params = {}
            for name, p in model.named_parameters():
                with deepspeed.zero.GatheredParameters([p]):
                    params[name.removeprefix("model.")] = p.detach().clone()
        else:
            params = {n.removeprefix("model."): p.detach().clone() for n, p in model.named_parameters()}
        results[stage] = {"params": params, "optimizer": type(opt).__name__}
    buf = io.BytesIO()
    torch.save(results, buf)
    return buf.getvalue()


def _run_ds(stages, world=2, timeout=300):
    payloads = run_distributed_hard_exit(_ds_body, world, stages, env={"DS_ACCELERATOR": "cpu"},
                                         timeout=timeout)
    return [torch.load(io.BytesIO(p), weights_only=True) for p in payloads]


def _reference(stage):
    model = _model(stage)
    opt = build_optimizer(model, OPTIM)
    sched = _sched(opt)
    for tokens, labels in _batches():
        model.zero_grad(set_to_none=True)
        model(tokens, labels).backward()
        assert opt.step().grad_norm > OPTIM.clip_grad      # clipping is active
        sched.step()
    return {n.removeprefix("model."): p for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("stages", [(1, 2), (3,)], ids=["zero1-2", "zero3"])
def test_deepspeed_zero_stages_match_single_process(stages):
    pytest.importorskip("deepspeed")
    outs = _run_ds(stages, timeout=120)
    for stage in stages:
        ref = _reference(stage)
        for out in outs:
            assert ("Stage3" in out[stage]["optimizer"]) == (stage == 3)
            for name, p in ref.items():
                torch.testing.assert_close(out[stage]["params"][name], p.detach(), rtol=1e-5,
                                           atol=2e-6, msg=f"ZeRO-{stage} {name}")


def test_config_fills_batch_and_rejects_conflicts():
    cfg = build_deepspeed_config({"zero_optimization": {"stage": 2}}, micro_batch_size=2,
                                 global_batch_size=16, dp_size=2, clip_grad=1.0, bf16=True)
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["train_batch_size"] == 16
    assert cfg["gradient_clipping"] == 1.0 and cfg["bf16"]["enabled"] is True
    with pytest.raises(ValueError, match="disagrees"):
        build_deepspeed_config({"zero_optimization": {"stage": 2}}, micro_batch_size=2, dp_size=1,
                               zero_stage=3)
    with pytest.raises(ValueError, match="optimizer"):
        build_deepspeed_config({"optimizer": {"type": "AdamW"}}, micro_batch_size=1, dp_size=1)
    for key in ("offload_optimizer", "offload_param"):
        with pytest.raises(ValueError, match=f"{key}.device = 'cpu'.*offload is not supported"):
            build_deepspeed_config({"zero_optimization": {"stage": 3, key: {"device": "cpu"}}},
                                   micro_batch_size=1, dp_size=1)
    assert build_deepspeed_config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}},
                                  micro_batch_size=1, dp_size=1)["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="multiple"):
        build_deepspeed_config({}, micro_batch_size=3, global_batch_size=8, dp_size=2)


def _gathered_body(rank, world, knobs):
    from megatron_alcot.model import build_model
    from megatron_alcot.parallel import parallel_state
    torch.set_num_threads(1)
    parallel_state.initialize_model_parallel(1, 1)
    cfg = preset("tiny", seq_length=SEQ, latent_max_steps=2, untie_embeddings_and_output_weights=False)
    model = build_model(cfg)
    engine, _ = initialize_deepspeed(
        model, None, {"steps_per_print": 10 ** 9, "zero_optimization": knobs}, lr=OPTIM.lr,
        micro_batch_size=BATCH // world, global_batch_size=BATCH, zero_stage=3)
    external = {id(p) for p in engine.module.outside_forward_parameters()}
    layer_params = [p for p in model.parameters() if id(p) not in external]
    seen = {"forward": [], "backward": []}

    def sample(phase):
        seen[phase].append(sum(p.data.numel() for p in layer_params))

    def after_forward(module, args, out):
        sample("forward")
        if torch.is_tensor(out) and out.requires_grad:
            out.register_hook(lambda g: sample("backward"))
    for module in model.modules():
        module.register_forward_hook(after_forward)
    tokens, labels = _batches()[0]
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for _ in range(2):
        engine.backward(engine(tokens[rows], labels=labels[rows]).loss)
        engine.step()
    largest_module = max(sum(p.ds_numel for p in m.parameters(recurse=False)) for m in model.modules())
    return {"max": {k: max(v) for k, v in seen.items()}, "largest_module": largest_module,
            "all": sum(p.ds_numel for p in layer_params)}


@pytest.mark.slow
def test_zero3_releases_layer_weights_between_modules_in_forward_and_backward():
    """With the project model (laps call each layer again, tied head), ZeRO-3 holds at most one
    module's own weights gathered beyond the parameters read outside their module's forward."""
    pytest.importorskip("deepspeed")
    knobs = {"stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
             "stage3_prefetch_bucket_size": 0}
    for out in run_distributed_hard_exit(_gathered_body, 2, knobs, env={"DS_ACCELERATOR": "cpu"},
                                         timeout=120):
        assert out["largest_module"] < out["all"] / 4
        for phase in ("forward", "backward"):
            assert out["max"][phase] <= out["largest_module"], (phase, out)
