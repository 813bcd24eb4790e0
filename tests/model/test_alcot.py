"""ALCoT against a naive per-(t, k) reference: logits, loss, halting, exit masses, gradients
(including those that reach earlier laps' keys/values), compaction, loss mask, lap-cut backward."""

import pytest
import torch

from alcot_reference import naive_forward, routers_random
from megatron_alcot.model import build_model
from megatron_alcot.model.presets import preset

B, S = 3, 8


def _model(**kw):
    cfg = preset("tiny", latent_max_steps=3, seq_length=S, latent_threshold=0.2, **kw)
    model = build_model(cfg)
    routers_random(model)
    return model


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (B, S), generator=g)
    labels = torch.randint(0, 256, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.25).float()
    return tokens, labels, mask


def _pattern(step, reach_next, active):
    t = torch.arange(active.shape[1])
    b = torch.arange(active.shape[0])[:, None]
    return (t + 2 * b + step) % 3 != 0


def _grads(loss, model):
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _close_grads(actual, expected, names, rtol=2e-5):
    for n, a, e in zip(names, actual, expected):
        scale = e.abs().max().clamp_min(1e-6)
        assert ((a - e).abs().max() / scale) < rtol, n


@pytest.mark.parametrize("readout,scope", [("hidden", "continued"), ("prob", "continued"),
                                           ("hidden", "decided")])
def test_matches_naive_reference(readout, scope):
    model = _model(latent_readout=readout, latent_loss_scope=scope)
    names = [n for n, _ in model.named_parameters()]
    tokens, labels, mask = _batch()
    modes = ["learned", "never", "always", _pattern] if readout == "hidden" else ["learned", _pattern]
    for halting in modes:
        ref = naive_forward(model, tokens, labels, mask, halting)
        out = model(tokens, labels=labels, loss_mask=mask, halting=halting, return_logits=True)
        assert torch.equal(out.num_steps, ref["num_steps"]), halting
        if halting in ("learned", _pattern):
            assert len(out.num_steps.unique()) >= 2   # compaction with uneven rows is exercised
        torch.testing.assert_close(out.logits, ref["logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.exit_mass, ref["exit"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.lm_loss, ref["lm_loss"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.latent_loss, ref["latent_loss"], atol=1e-7, rtol=1e-5)
        _close_grads(_grads(out.loss, model), _grads(ref["loss"], model), names)


def test_decided_scope_also_penalises_the_halting_decision():
    """Scope "decided" adds the halting decision's term, so the router that stops a token still
    gets the penalty's gradient; "continued" leaves that router without one."""
    tokens, labels, mask = _batch()
    outs = {}
    for scope in ("continued", "decided"):
        torch.manual_seed(0)
        model = _model(latent_loss_scope=scope)
        out = model(tokens, labels=labels, loss_mask=mask)
        outs[scope] = out
        last = model.latent.routers[0].bias
        (g,) = torch.autograd.grad(out.latent_loss, [last])
        outs[scope + "_grad"] = g
    assert torch.equal(outs["continued"].num_steps, outs["decided"].num_steps)
    assert outs["decided"].latent_loss > outs["continued"].latent_loss
    assert (outs["decided_grad"] > outs["continued_grad"]).all()


def test_exit_mass_matches_direct_formula():
    model = _model()
    tokens, labels, mask = _batch(1)
    out = model(tokens, labels=labels, halting="learned")
    g, ell = out.continue_prob, out.num_steps
    L = model.config.latent_max_steps
    expected = torch.zeros(B, S, L + 1)
    for bi in range(B):
        for t in range(S):
            r = 1.0
            for k in range(int(ell[bi, t]) + 1):
                expected[bi, t, k] = r if k == ell[bi, t] else r * (1 - g[bi, t, k])
                r = r * g[bi, t, k] if k < L else r
    torch.testing.assert_close(out.exit_mass, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.exit_mass.sum(-1), torch.ones(B, S), atol=1e-6, rtol=0)
    # Halting rule: ℓ_t is the first k with k = ℓmax or r_{t,k+1} < τ.
    reach = torch.cumprod(g, -1)
    below = torch.cat([reach < model.config.latent_threshold, torch.ones(B, S, 1, dtype=torch.bool)], -1)
    assert torch.equal(ell, below.int().argmax(-1))
    assert torch.equal(out.lap_active, out.lap_executed.sum((1, 2)))


def test_compaction_equals_compute_all_and_mask():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    tokens, labels, mask = _batch(2)
    for halting in ["learned", _pattern]:
        a = model(tokens, labels=labels, loss_mask=mask, halting=halting, return_logits=True)
        b = model(tokens, labels=labels, loss_mask=mask, halting=halting, return_logits=True, compact=False)
        assert torch.equal(a.num_steps, b.num_steps)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)
        _close_grads(_grads(a.loss, model), _grads(b.loss, model), names, rtol=1e-5)


def test_loss_mask_and_router_init():
    cfg = preset("tiny", latent_max_steps=2, seq_length=S)
    model = build_model(cfg)
    tokens, labels, mask = _batch(3)
    out = model(tokens, labels=labels, loss_mask=mask)
    torch.testing.assert_close(out.continue_prob, torch.full((B, S, 2), 0.9))   # bias = logit(0.9)
    torch.testing.assert_close(out.lm_loss, (out.per_token_loss * mask).sum() / mask.sum())
    # Labels at masked positions change neither term of the loss.
    labels2 = torch.where(mask > 0, labels, (labels + 7) % 256)
    out2 = model(tokens, labels=labels2, loss_mask=mask)
    assert torch.equal(out.loss, out2.loss) and torch.equal(out.latent_loss, out2.latent_loss)
    full = model(tokens, labels=labels)
    assert not torch.equal(full.latent_loss, out.latent_loss)
    # λ = 0 leaves only the LM loss.
    cfg0 = preset("tiny", latent_max_steps=2, seq_length=S, latent_loss_weight=0.0)
    out0 = build_model(cfg0)(tokens, labels=labels, loss_mask=mask)
    assert out0.latent_loss == 0 and torch.equal(out0.loss, out0.lm_loss)


def _leaf_kv(kv):
    return type(kv)(kv.order, kv.valid, [k.detach().requires_grad_() for k in kv.keys],
                    [v.detach().requires_grad_() for v in kv.values])


def test_lap_cut_backward_equals_one_graph():
    """What a pipeline schedule does: each lap takes its input and the earlier laps' K/V as
    detached leaves; the backward walks the laps last to first, feeding every lap the gradients
    that later laps put on its output and on its keys/values. Same gradients as one graph, and the
    earlier laps' K/V do receive gradient."""
    model = _model()
    method = model.latent
    names = [n for n, _ in model.named_parameters()]
    tokens, labels, mask = _batch(4)
    whole = model(tokens, labels=labels, loss_mask=mask)
    expected = _grads(whole.loss, model)

    lap = method.first_lap(model, tokens)
    ctx = method.begin(model, lap, labels=labels, loss_mask=mask)
    laps, past_leaves = [], []          # per lap: (input leaf, next-lap hidden, kv, kv leaves)
    while lap is not None:
        x = lap.hidden
        if lap.k > 0:
            x = lap.hidden.detach().requires_grad_()
            lap.hidden = x
        leaves = [_leaf_kv(kv) for kv in [entry[2] for entry in laps]]
        hidden, kv = model.run_lap(lap, leaves)
        past_leaves.append(leaves)
        lap = method.end_lap(model, ctx, lap, hidden)
        laps.append([x, None if lap is None else lap.hidden, kv])
    assert len(laps) == 4
    out = method.finish(model, ctx)
    torch.testing.assert_close(out.loss, whole.loss, atol=0, rtol=0)
    model.zero_grad()
    out.loss.backward(retain_graph=True)
    for k in reversed(range(len(laps))):
        _, h_next, kv = laps[k]
        outs, grads = [], []
        if h_next is not None and laps[k + 1][0].grad is not None:
            outs.append(h_next)
            grads.append(laps[k + 1][0].grad)
        for j in range(k + 1, len(laps)):
            leaf = past_leaves[j][k]
            for a, b in zip(leaf.keys + leaf.values, kv.keys + kv.values):
                assert a.grad is not None and a.grad.abs().sum() > 0, (j, k)
                outs.append(b)
                grads.append(a.grad)
        if outs:
            torch.autograd.backward(outs, grads, retain_graph=True)
    got = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    _close_grads(got, expected, names, rtol=1e-5)
