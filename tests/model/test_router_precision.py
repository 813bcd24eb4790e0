"""Routers, reach and exit masses stay fp32 under bf16 autocast and in bf16-stored models."""
import math

import pytest
import torch
import torch.nn.functional as F

from alcot_reference import routers_random
from megatron_alcot.model import build_model
from megatron_alcot.model.presets import preset
from megatron_alcot.model.latent.router import Routers, halting_update, router_logit

B, S = 3, 16


def _fp32_router(model, k, h):
    """The reference: the router's GEMV and sigmoid in fp32, outside any autocast."""
    lin = model.latent.routers[k]
    return torch.sigmoid(F.linear(h.float(), lin.weight, lin.bias).squeeze(-1))


def test_init_prob_exact_under_autocast():
    routers = Routers(64, 2, 0.9)
    h = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = routers.continue_prob(0, h.bfloat16())
        naive = torch.sigmoid(routers[0](h).squeeze(-1))      # what autocast alone would give
    assert g.dtype == torch.float32
    assert torch.equal(g, torch.full_like(g, 1 / (1 + math.exp(-math.log(9.0)))))
    assert naive.dtype == torch.bfloat16 and not torch.equal(naive.float(), g)


def test_router_of_bf16_weights_is_evaluated_in_fp32():
    lin = torch.nn.Linear(8, 1).bfloat16()
    h = torch.randn(5, 8).bfloat16().float()
    expected = F.linear(h, lin.weight.float(), lin.bias.float()).squeeze(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router_logit(lin, h.bfloat16())
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_halting_update_keeps_fp32_near_saturation():
    g = torch.tensor([[0.999, 0.9999, 0.99]], dtype=torch.float32)
    reach = torch.ones_like(g)
    active = torch.ones_like(g, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r_next, cont, e = halting_update(reach, g, active, 0.5, 0)
    assert r_next.dtype == e.dtype == torch.float32
    assert torch.equal(e, 1.0 - g)          # (1 - g) keeps its fp32 bits


@pytest.mark.parametrize("readout", ["hidden", "prob"])
def test_alcot_under_bf16_autocast_routes_in_fp32(readout):
    cfg = preset("tiny", latent_max_steps=3, seq_length=S, latent_threshold=0.3,
                 latent_readout=readout, untie_embeddings_and_output_weights=True)
    model = build_model(cfg)
    routers_random(model)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (B, S), generator=g)
    labels = torch.randint(0, 256, (B, S), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, labels=labels, return_lap_hidden=True)
    out.loss.backward()
    assert out.continue_prob.dtype == out.exit_mass.dtype == torch.float32
    # g of every lap bit-equal to the fp32 router applied to the same hidden state (outside
    # autocast), and the halting decisions those fp32 values imply are the ones taken.
    reach = torch.ones(B, S)
    active = torch.ones(B, S, dtype=torch.bool)
    for k, h in enumerate(out.lap_hidden[:3]):
        ref_g = _fp32_router(model, k, h)
        assert torch.equal(out.continue_prob[..., k], torch.where(active, ref_g, 0.0)), k
        r_next, cont, e = halting_update(reach, ref_g, active, cfg.latent_threshold, k)
        assert torch.equal(out.lap_executed[k + 1], cont), k
        assert torch.equal(out.exit_mass[..., k], e), k
        reach, active = r_next, cont
    assert len(out.num_steps.unique()) >= 2       # uneven halting is exercised
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in model.latent.routers.parameters())
