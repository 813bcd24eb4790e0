"""No information flows against the 2-D mask: (t, k) never depends on tokens after t, on inputs of
(t', k') with t' > t or k' > k, or on inputs of tokens that did not execute a step."""
import pytest
import torch

from alcot_reference import routers_random
from megatron_alcot.model import build_model
from megatron_alcot.model.output import LapState
from megatron_alcot.model.presets import preset

B, S, T0 = 2, 12, 7


def _model(method="alcot"):
    model = build_model(preset("tiny", latent_method=method, latent_max_steps=3, seq_length=S,
                               latent_threshold=0.2))
    routers_random(model)
    return model


def _laps(model, tokens, halting, perturb=None, compact=True):
    """Run every lap by hand; ``perturb(step, lap)`` may change a lap's input. Returns per-lap
    (h_k after the final norm, executed mask)."""
    method = model.latent
    lap = method.first_lap(model, tokens)
    ctx = method.begin(model, lap, halting=halting)
    past, result = [], []
    while lap is not None:
        if perturb is not None:
            lap = perturb(lap.k, lap)
        hidden, kv = model.run_lap(lap, past, compact=compact)
        past.append(kv)
        result.append((model.decoder.final_layernorm(hidden), lap.active))
        lap = method.end_lap(model, ctx, lap, hidden)
    return result


@torch.no_grad()
@pytest.mark.parametrize("method,halting", [("vanilla", "learned"), ("alcot", "never"),
                                            ("alcot", "learned")])
def test_future_tokens_do_not_leak(method, halting):
    model = _model(method)
    tokens = torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, T0:] = (changed[:, T0:] + 1 + torch.arange(S - T0)) % 256
    a = model(tokens, halting=halting, return_lap_hidden=True)
    b = model(changed, halting=halting, return_lap_hidden=True)
    assert torch.equal(a.num_steps[:, :T0], b.num_steps[:, :T0])
    assert len(a.lap_hidden) == (1 if method == "vanilla" else 4)
    for ha, hb, ex in zip(a.lap_hidden, b.lap_hidden, a.lap_executed):
        ran = ex[:, :T0]
        torch.testing.assert_close(ha[:, :T0][ran], hb[:, :T0][ran], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(ha[:, T0:][ex[:, T0:]], hb[:, T0:][ex[:, T0:]])
    torch.testing.assert_close(a.logits[:, :T0], b.logits[:, :T0], atol=1e-5, rtol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("halting,compact", [("never", True), ("learned", True), ("learned", False)])
def test_deeper_and_later_inputs_do_not_leak(halting, compact):
    model = _model()
    tokens = torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(1))
    base = _laps(model, tokens, halting, compact=compact)
    K1, T1 = 1, 5

    def perturb(step, lap):
        if step != K1:
            return lap
        hidden = lap.hidden.clone()
        hidden[:, T1] += 3.0
        return LapState(hidden, lap.active, lap.reach, lap.k, lap.position_ids)

    # Halting decisions follow the perturbed states, so compare under the same decisions.
    executed = [ex for _, ex in base]
    forced = lambda k, r, active: executed[k + 1] if k + 1 < len(executed) else torch.zeros_like(active)
    base = _laps(model, tokens, forced, compact=compact)
    moved = _laps(model, tokens, forced, perturb, compact=compact)
    for k, ((ha, ex), (hb, _)) in enumerate(zip(base, moved)):
        safe = torch.ones(B, S, dtype=torch.bool) if k < K1 else (torch.arange(S) < T1).expand(B, S)
        torch.testing.assert_close(ha[safe & ex], hb[safe & ex], atol=1e-6, rtol=1e-6)
    hit = base[K1][1][:, T1]
    assert hit.any()
    assert not torch.allclose(base[K1][0][:, T1][hit], moved[K1][0][:, T1][hit])


@torch.no_grad()
@pytest.mark.parametrize("compact", [True, False])
def test_inputs_of_unexecuted_tokens_are_invisible(compact):
    """A token that halted after step 0 keeps a lap-1 input row (static shapes); changing it must
    change nothing, also when every row is computed and only masked (compact=False)."""
    model = _model()
    tokens = torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(2))
    halt_t = 3
    rule = lambda k, r, active: (torch.arange(S) != halt_t).expand(B, S)

    def perturb(step, lap):
        if step == 0:
            return lap
        hidden = lap.hidden.clone()
        hidden[:, halt_t] = torch.randn(B, hidden.shape[-1]) * 5
        return LapState(hidden, lap.active, lap.reach, lap.k, lap.position_ids)

    base = _laps(model, tokens, rule, compact=compact)
    moved = _laps(model, tokens, rule, perturb, compact=compact)
    for (ha, ex), (hb, _) in zip(base, moved):
        torch.testing.assert_close(ha[ex], hb[ex], atol=1e-6, rtol=1e-6)
    assert not base[1][1][:, halt_t].any()
