"""The exported model routes in fp32: under bf16 autocast and with bf16 weights, g at init is the
configured 0.9 (not bf16's 0.90234375) and the router equals its fp32 evaluation bit for bit."""
import math

import torch
import torch.nn.functional as F

from megatron_alcot.hf.configuration_llama_alcot import LlamaAlcotConfig
from megatron_alcot.hf.modeling_llama_alcot import LlamaAlcotForCausalLM, _router_prob

V = 128


def _model():
    torch.manual_seed(0)
    cfg = LlamaAlcotConfig(latent_method="alcot", latent_max_steps=2, latent_threshold=0.3,
                           vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    model = LlamaAlcotForCausalLM(cfg).eval()
    with torch.no_grad():                 # the exported routers at initialisation
        for r in model.latent.routers:
            r.weight.zero_()
            r.bias.fill_(math.log(0.9 / 0.1))
    return model


def test_router_prob_is_fp32_under_autocast_and_bf16_weights():
    lin = torch.nn.Linear(64, 1).bfloat16()
    h = torch.randn(3, 5, 64).bfloat16()
    expected = torch.sigmoid(F.linear(h.float(), lin.weight.float(), lin.bias.float()).squeeze(-1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _router_prob(lin, h)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_bf16_autocast_forward_starts_at_init_prob():
    m = _model()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    seen = []
    real = _router_prob

    def record(router, h):
        g = real(router, h)
        seen.append(g)
        return g

    import megatron_alcot.hf.modeling_llama_alcot as modeling
    modeling._router_prob = record
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(ids)
    finally:
        modeling._router_prob = real
    assert seen and (seen[0].double() - 0.9).abs().max() <= torch.finfo(torch.float32).eps
    assert torch.equal(out.num_steps, torch.full_like(out.num_steps, 2))   # 0.9, 0.81 >= 0.3
