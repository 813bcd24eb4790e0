"""--attention-backend: the unfused core equals torch's SDPA (outputs and gradients; causal, 2-D
masks, GQA), inside the ALCoT model too, and ``auto`` picks it only where it measured faster."""
import pytest
import torch

from megatron_alcot.config import ConfigError
from megatron_alcot.model import build_model
from megatron_alcot import hardware
from megatron_alcot.model.attention_backends import UNFUSED_MAX_KEYS, core_attention, resolve_backend
from megatron_alcot.model.presets import preset


def _qkv(dtype, b=2, heads=4, groups=2, m=12, keys=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, m, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(b, groups, keys, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(b, groups, keys, d, generator=g).to(dtype).requires_grad_()
    return q, k, v


def _run(backend, q, k, v, mask):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = core_attention(q, k, v, mask=mask, backend=backend)
    out.float().square().sum().backward()
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_unfused_equals_sdpa(masked, dtype, tol):
    keys = 24 if masked else 12         # a lap's queries see two key blocks
    q, k, v = _qkv(dtype, keys=keys)
    mask = None
    if masked:                          # token order, some keys not executed, as attention_mask builds
        g = torch.Generator().manual_seed(1)
        mask = torch.rand(2, 1, 12, keys, generator=g) < 0.6
        mask[..., 0] = True             # no row is fully masked (the model guarantees this too)
    ref = _run("sdpa", q, k, v, mask)
    got = _run("unfused", q, k, v, mask)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_auto_picks_unfused_only_where_measured_faster_and_keys_are_few():
    q32 = torch.zeros(1, 1, 4, 8)
    q16 = q32.bfloat16()
    for q in (q32, q16):      # the decision itself is tested with fake measurements in test_hardware.py
        assert resolve_backend("auto", q, UNFUSED_MAX_KEYS) == hardware.attention_choice(q.dtype).choice
        assert resolve_backend("auto", q, UNFUSED_MAX_KEYS + 1) == "sdpa"
    assert resolve_backend("unfused", q32, 10 ** 6) == "unfused"
    assert resolve_backend("sdpa", q16, 8) == "sdpa"


@pytest.mark.parametrize("method", ["vanilla", "alcot"])
def test_model_backends_agree(method):
    """Whole model, fp32: loss, logits and every parameter gradient agree between the backends
    (ALCoT exercises the 2-D lap masks and key reuse; halting forced to a fixed pattern)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 32), generator=g)
    labels = torch.randint(0, 256, (2, 32), generator=g)
    halting = lambda k, r, active: (torch.arange(32) % (k + 2) != 0).expand_as(active)  # noqa: E731
    results = []
    for backend in ("sdpa", "unfused"):
        model = build_model(preset("tiny", latent_method=method, latent_max_steps=2,
                                   attention_backend=backend))
        out = model(tokens, labels=labels, halting=halting if method == "alcot" else "learned",
                    return_logits=True)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-5, rtol=1e-4, msg=n)


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="--attention-backend"):
        preset("tiny", attention_backend="flash3").validate()
