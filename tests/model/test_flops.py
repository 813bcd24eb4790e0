"""The analytic FLOPs counter against direct counts: executed (token, step) pairs and visible keys
by brute force over the 2-D mask, N_dense from the model's own weights, the baselines' multipliers."""
import itertools

import pytest
import torch

from megatron_alcot.model import build_model, flops
from megatron_alcot.model.presets import preset

pytestmark = pytest.mark.usefixtures("one_thread")


def _brute_pairs(num_steps):
    """Σ over executed (t, k) of executed (t', k') with t' ≤ t and k' ≤ k, by enumeration."""
    total = 0
    b, s = num_steps.shape
    for row in range(b):
        ell = num_steps[row].tolist()
        executed = [(t, k) for t in range(s) for k in range(ell[t] + 1)]
        for (t, k), (tp, kp) in itertools.product(executed, executed):
            total += tp <= t and kp <= k
    return total


def test_visible_keys_and_passes_match_brute_force():
    g = torch.Generator().manual_seed(0)
    for K in (0, 1, 3):
        num_steps = torch.randint(0, K + 1, (3, 9), generator=g)
        assert flops.visible_key_pairs(num_steps, K) == _brute_pairs(num_steps)
        cfg = preset("tiny", latent_max_steps=K, latent_method="alcot" if K else "vanilla")
        parts = flops.flops_breakdown(cfg, num_steps)
        assert parts["token_passes"] == sum(1 + e for e in num_steps.flatten().tolist())


def test_dense_params_equal_the_model_layer_weights():
    for kw in ({}, dict(num_query_groups=4), dict(ffn_hidden_size=96)):
        cfg = preset("tiny", **kw)
        model = build_model(cfg)
        n = sum(p.numel() for name, p in model.named_parameters()
                if name.startswith("decoder.layers.") and p.dim() == 2)
        assert flops.dense_params(cfg) == n


def test_terms_follow_the_formulas():
    K = 3
    cfg = preset("tiny", latent_max_steps=K, latent_loss_weight=0.03)
    h, V, N = cfg.hidden_size, cfg.padded_vocab_size(), flops.dense_params(cfg)
    width = cfg.num_attention_heads * cfg.head_dim
    num_steps = torch.tensor([[0, 3, 1, 2, 3], [1, 1, 0, 0, 2]])
    passes, latent = int((1 + num_steps).sum()), int(num_steps.sum())
    pairs = _brute_pairs(num_steps)
    decisions = sum(min(e + 1, K) for e in num_steps.flatten().tolist())
    t = flops.flops_breakdown(cfg, num_steps)
    assert t["dense"] == 6 * N * passes
    assert t["attention"] == 12 * width * cfg.num_layers * pairs
    assert t["head"] == 6 * h * V * num_steps.numel()
    assert t["target_probs"] == 2 * h * V * latent
    assert t["router"] == 6 * h * decisions
    assert flops.training_flops(cfg, num_steps, seq_length=5) == pytest.approx(t["total"])
    mask = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert flops.flops_breakdown(cfg, num_steps, loss_mask=mask)["target_probs"] == \
        2 * h * V * int((num_steps * mask).sum())
    f = flops.flops_breakdown(cfg, num_steps, training=False)
    assert f["dense"] == 2 * N * passes and f["target_probs"] == 0
    assert flops.forward_flops(cfg, num_steps) == pytest.approx(f["total"])
    prob = flops.flops_breakdown(preset("tiny", latent_max_steps=K, latent_readout="prob"), num_steps)
    assert prob["head"] == 6 * h * V * passes
    with pytest.raises(ValueError, match="seq_length"):
        flops.training_flops(cfg, num_steps, seq_length=4)


def test_nominal_and_baseline_multipliers():
    K, b, s = 3, 2, 16
    base = dict(latent_max_steps=K, seq_length=s)
    full = torch.full((b, s), K)
    vanilla = flops.flops_breakdown(preset("tiny", latent_method="vanilla", **base), torch.zeros(b, s))
    alcot_cfg = preset("tiny", **base)
    alcot = flops.flops_breakdown(alcot_cfg, full)
    assert flops.nominal_training_flops(alcot_cfg, b, s) == pytest.approx(alcot["total"])
    assert alcot["dense"] == (K + 1) * vanilla["dense"]
    # Fixed depth: query (t, k) sees (k+1)(t+1) keys.
    assert alcot["key_pairs"] == b * sum((k + 1) * (t + 1) for t in range(s) for k in range(K + 1))
    loop = flops.flops_breakdown(preset("tiny", latent_method="loop", **base), full)
    assert loop["dense"] == (K + 1) * vanilla["dense"] and loop["head"] == vanilla["head"]
    assert loop["attention"] == (K + 1) * vanilla["attention"]
    pause = flops.flops_breakdown(preset("tiny", latent_method="pause", **base), full)
    assert pause["dense"] == (K + 1) * vanilla["dense"]
    assert pause["key_pairs"] == b * (K + 1) * s * ((K + 1) * s + 1) // 2     # ≈ (K+1)² vanilla
    ponder = flops.flops_breakdown(preset("tiny", latent_method="ponder", **base), full)
    assert ponder["head"] == (K + 1) * vanilla["head"]
    assert ponder["ponder_embed"] == K * vanilla["head"]
    # Pruning lowers the executed count below the nominal one.
    assert flops.training_flops(alcot_cfg, torch.ones(b, s, dtype=torch.long)) < alcot["total"]


def test_counter_reads_num_steps_of_a_real_forward():
    cfg = preset("tiny", latent_max_steps=2, seq_length=8, latent_threshold=0.5)
    model = build_model(cfg)
    with torch.no_grad():
        for r in model.latent.routers:
            r.weight.normal_(0, 0.3)
    out = model(torch.randint(0, 256, (2, 8)))
    parts = flops.flops_breakdown(cfg, out.num_steps)
    assert parts["token_passes"] == int(out.lap_active.sum())
