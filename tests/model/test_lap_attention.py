"""The lap-mask attention core (FlexAttention over the lap layout) against SDPA with the dense mask:
random compacted layouts over several steps, GQA, and every method's masks inside the model.

On CPU this torch's FlexAttention has no backward: forward outputs are compared with no gradient,
and with gradients ``--attention-backend flex`` must take the SDPA path (outputs and gradients
equal to SDPA's)."""
import pytest
import torch

from megatron_alcot.model import attention_backends, build_model
from megatron_alcot.model.attention_backends import core_attention, resolve_backend
from megatron_alcot.model.compaction import Compaction
from megatron_alcot.model.lap_attention import LapMask
from megatron_alcot.model.presets import preset


def _layout(b=2, s=40, steps=3, seed=0):
    """Each step's Compaction of a random, shrinking active set (as laps produce them)."""
    g = torch.Generator().manual_seed(seed)
    active = torch.ones(b, s, dtype=torch.bool)
    comps = []
    for _ in range(steps):
        comps.append(Compaction.build(active))
        active = active & (torch.rand(b, s, generator=g) < 0.7)
    return comps


def _lap_mask(comps):
    q = comps[-1]
    return LapMask.from_blocks(q.order, q.valid, [c.order for c in comps], [c.valid for c in comps])


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_flex_forward_equals_sdpa(heads, groups, steps):
    comps = _layout(steps=steps, seed=steps)
    lm = _lap_mask(comps)
    b, _, m, keys = lm.shape
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, heads, m, 16, generator=g)
    k = torch.randn(b, groups, keys, 16, generator=g)
    v = torch.randn(b, groups, keys, 16, generator=g)
    with torch.no_grad():
        ref = core_attention(q, k, v, mask=lm.dense(), backend="sdpa")
        got = core_attention(q, k, v, mask=lm, backend="flex")
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


def test_dense_mask_rule():
    comps = _layout(steps=3, seed=4)
    lm = _lap_mask(comps)
    dense = lm.dense()[:, 0]
    q = comps[-1]
    for bi in range(q.batch):
        for i in range(q.m):
            for j in range(dense.shape[-1]):
                expect = (not bool(q.valid[bi, i])) or (
                    bool(lm.k_valid[bi, j]) and int(lm.k_order[bi, j]) <= int(q.order[bi, i]))
                assert bool(dense[bi, i, j]) == expect


def test_flex_with_gradient_on_cpu_takes_sdpa(monkeypatch):
    comps = _layout(steps=2, seed=2)
    lm = _lap_mask(comps)
    b, _, m, keys = lm.shape
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(b, 4, m, 8, generator=g), torch.randn(b, 2, keys, 8, generator=g),
            torch.randn(b, 2, keys, 8, generator=g)]
    calls = []
    monkeypatch.setattr(attention_backends, "flex_lap_attention",
                        lambda *a: calls.append(1) or pytest.fail("flex has no CPU backward"))
    results = []
    for backend, mask in (("flex", lm), ("sdpa", lm.dense())):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = core_attention(q, k, v, mask=mask, backend=backend)
        out.square().sum().backward()
        results.append((out, q.grad, k.grad, v.grad))
    for a, e in zip(*results):
        assert torch.equal(a, e)
    assert not calls


def test_auto_prefers_flex_for_lap_masks_on_cuda_only():
    q = torch.zeros(1, 1, 4, 8)
    assert resolve_backend("auto", q, 16, lap_mask=True) == "sdpa"
    assert resolve_backend("auto", q.to("meta"), 16, lap_mask=True) == "sdpa"
    assert "cuda" in attention_backends.FLEX_ON


@pytest.mark.parametrize("method", ["vanilla", "alcot", "loop", "pause", "ponder"])
def test_model_flex_equals_sdpa(method, monkeypatch):
    """Every method's masks: no-grad logits through flex equal SDPA's; with gradients (SDPA path
    on CPU) loss and every parameter gradient equal."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 24), generator=g)
    labels = torch.randint(0, 256, (2, 24), generator=g)
    halting = lambda k, r, active: (torch.arange(24) % (k + 2) != 0).expand_as(active)  # noqa: E731
    kw = dict(halting=halting) if method == "alcot" else {}
    calls = []
    real = attention_backends.flex_lap_attention
    monkeypatch.setattr(attention_backends, "flex_lap_attention",
                        lambda *a: calls.append(1) or real(*a))
    results = []
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = build_model(preset("tiny", latent_method=method, latent_max_steps=2,
                                   attention_backend=backend, untie_embeddings_and_output_weights=True))
        with torch.no_grad():
            logits = model(tokens, return_logits=True, **kw).logits
        out = model(tokens, labels=labels, **kw)
        out.loss.backward()
        results.append((logits, out.loss, {n: p.grad for n, p in model.named_parameters()
                                           if p.grad is not None}))
    (la, loss_a, ga), (lb, loss_b, gb) = results
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
    assert torch.equal(loss_a, loss_b)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga)
    if method == "alcot":
        assert calls        # laps >= 1 went through FlexAttention
