import math

import pytest
import torch

from megatron_alcot.config import ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig
from megatron_alcot.optim import (DynamicGradScaler, OptimizerParamScheduler, build_optimizer,
                                  get_grad_norm, lr_at, param_groups)

from dist_utils import run_distributed


def _sched(style, warmup=10, decay=100, max_lr=1.0, min_lr=0.1):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    return OptimizerParamScheduler(opt, max_lr=max_lr, min_lr=min_lr, warmup_iters=warmup,
                                   decay_iters=decay, decay_style=style), opt


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_lr_schedule_closed_form(style):
    sched, opt = _sched(style)
    seen = []
    for step in range(130):
        assert opt.param_groups[0]["lr"] == pytest.approx(sched.get_lr(step))
        seen.append(opt.param_groups[0]["lr"])
        sched.step()
    for step in range(11):                                   # linear warm-up from 0
        assert seen[step] == pytest.approx(step / 10)
    for step in (25, 55, 90):
        ratio = (step - 10) / 90
        expected = {"cosine": 0.1 + 0.9 * 0.5 * (math.cos(math.pi * ratio) + 1),
                    "linear": 0.1 + 0.9 * (1 - ratio), "constant": 1.0}[style]
        assert seen[step] == pytest.approx(expected)
    assert seen[100] == pytest.approx(0.1 if style != "constant" else 1.0)
    assert seen[129] == pytest.approx(0.1 if style != "constant" else 1.0)   # floor at min-lr


def test_scheduler_state_round_trip_and_warmup_fraction():
    sched, _ = _sched("cosine")
    for _ in range(37):
        sched.step()
    other, opt = _sched("cosine")
    other.load_state_dict(sched.state_dict())
    assert opt.param_groups[0]["lr"] == sched.get_lr()
    cfg = OptimizerConfig(lr=3e-4, min_lr=3e-5, lr_warmup_fraction=0.02)
    s = OptimizerParamScheduler.from_config(opt, cfg, train_iters=50000)
    assert s.warmup_iters == 1000 and s.get_lr(1000) == pytest.approx(3e-4)
    assert lr_at(50000, max_lr=3e-4, min_lr=3e-5, warmup_iters=1000, decay_iters=50000,
                 decay_style="cosine") == pytest.approx(3e-5)


def test_no_weight_decay_on_norms_and_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=True), torch.nn.LayerNorm(4))
    groups = {g["name"]: g for g in param_groups(model.named_parameters(), 0.1)}
    assert [p.shape for p in groups["decay"]["params"]] == [torch.Size([4, 4])]
    assert len(groups["no_decay"]["params"]) == 3 and groups["no_decay"]["weight_decay"] == 0.0


def test_dynamic_loss_scaler():
    s = DynamicGradScaler(initial_scale=1024, min_scale=1, growth_interval=3, hysteresis=2)
    s.update(True)
    assert s.scale == 1024                    # hysteresis absorbs the first overflow
    s.update(True)
    assert s.scale == 512
    for _ in range(3):
        s.update(False)
    assert s.scale == 1024


def test_overflow_skips_the_update():
    model = torch.nn.Linear(3, 3)
    opt = build_optimizer(model, OptimizerConfig(lr=0.1), TrainConfig(fp16=True, initial_loss_scale=8))
    before = model.weight.detach().clone()
    model(torch.ones(1, 3)).sum().mul(opt.loss_scale).backward()
    model.weight.grad[0, 0] = float("inf")
    result = opt.step()
    assert not result.updated and result.found_inf
    assert torch.equal(model.weight, before)


def _grad_norms(rank, world, tp):
    from megatron_alcot.model import build_model
    from megatron_alcot.parallel import parallel_state
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128,
                      seq_length=16, latent_max_steps=2, make_vocab_size_divisible_by=64,
                      untie_embeddings_and_output_weights=True)
    model = build_model(cfg, ParallelConfig(tensor_model_parallel_size=tp), seed=3)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (2, 16), generator=gen)
    model(tokens, labels=tokens.roll(-1, 1)).loss.backward()
    norm = float(get_grad_norm(list(model.parameters())))
    parallel_state.destroy_model_parallel()
    return norm


@pytest.mark.slow
def test_grad_norm_across_tensor_parallel_matches_single_process():
    # Same padded vocabulary at TP 1 and 2 (64 × 2 = 128), so the two models are the same function.
    single = _grad_norms(0, 1, 1)
    norms = run_distributed(_grad_norms, 2, 2)
    assert norms[0] == norms[1]
    assert norms[0] == pytest.approx(single, rel=1e-5)
