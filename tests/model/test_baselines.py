"""The loop, pause and ponder baselines against direct formulas of docs/method.md §9 on the
full weights (logits, loss, gradients), their output contract, and ponder/pause/loop under TP = 2
(vocab-parallel softmax and ``P·W_E``) equal to TP = 1."""
import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import run_distributed
from megatron_alcot.config import ParallelConfig
from megatron_alcot.model import build_model
from megatron_alcot.model.presets import preset
from megatron_alcot.parallel import parallel_state
from megatron_alcot.parallel.tensor_parallel import merge_shards

pytestmark = pytest.mark.usefixtures("one_thread")

B, S, K = 2, 8, 2
V_TRUE = 250          # padded to 256: ponder must give the padding rows probability 0


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, base):
    hd = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = pos[..., None].float() * inv
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def naive_stack(W, cfg, x, pos):
    """All layers on ``x [b, n, h]`` with a plain causal mask over n; no final norm."""
    b, n, _ = x.shape
    hd, nh, ng = cfg.head_dim, cfg.num_attention_heads, cfg.query_groups
    hpg = nh // ng
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        xn = _rms(x, W[p + "input_layernorm.weight"], cfg.norm_epsilon)
        qkv = (xn @ W[p + "self_attention.linear_qkv.weight"].t()).view(b, n, ng, hpg + 2, hd)
        q = _rope(qkv[:, :, :, :hpg].reshape(b, n, nh, hd), pos, cfg.rotary_base)
        k = _rope(qkv[:, :, :, hpg], pos, cfg.rotary_base).repeat_interleave(hpg, 2)
        v = qkv[:, :, :, hpg + 1].repeat_interleave(hpg, 2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        att = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        a = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, nh * hd)
        x = x + a @ W[p + "self_attention.linear_proj.weight"].t()
        xn = _rms(x, W[p + "pre_mlp_layernorm.weight"], cfg.norm_epsilon)
        gate, up = (xn @ W[p + "mlp.linear_fc1.weight"].t()).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ W[p + "mlp.linear_fc2.weight"].t()
    return x


def naive_logits(model, tokens):
    cfg = model.config
    W = dict(model.named_parameters())
    E, U = W["embedding.word_embeddings.weight"], W["output_layer.weight"]
    norm = lambda x: _rms(x, W["decoder.final_layernorm.weight"], cfg.norm_epsilon)  # noqa: E731
    b, s = tokens.shape
    pos = torch.arange(s).expand(b, s)
    d = cfg.hidden_size
    if cfg.latent_method == "loop":
        x = math.sqrt(2.5 * d) * E[tokens]
        for _ in range(K + 1):
            x = naive_stack(W, cfg, x, pos)
        return norm(x) @ U.t()
    if cfg.latent_method == "pause":
        u = math.sqrt(d) * E[tokens]
        x = torch.cat([u[:, :, None], W["latent.pause_embedding"].expand(b, s, K, d)], 2)
        h = naive_stack(W, cfg, x.reshape(b, s * (K + 1), d), pos.repeat_interleave(K + 1, 1))
        return norm(h[:, K::K + 1]) @ U.t()
    e0 = math.sqrt(d) * E[tokens]
    e = e0
    for j in range(K + 1):
        logits = norm(naive_stack(W, cfg, e, pos)) @ U.t()
        if j < K:
            probs = torch.softmax(logits[..., :V_TRUE], -1)
            e = e0 + probs @ (math.sqrt(d) * E[:V_TRUE])
    return logits


def _model(method, **kw):
    cfg = preset("tiny", latent_method=method, latent_max_steps=K, seq_length=S, vocab_size=V_TRUE, **kw)
    return build_model(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V_TRUE, (B, S), generator=g)
    labels = torch.randint(0, V_TRUE, (B, S), generator=g)
    return tokens, labels, (torch.rand(B, S, generator=g) > 0.3).float()


@pytest.mark.parametrize("method", ["loop", "pause", "ponder"])
def test_baseline_matches_direct_formula(method):
    model = _model(method)
    if method == "pause":
        assert model.latent.pause_embedding.abs().max() > 0
    tokens, labels, mask = _batch()
    out = model(tokens, labels=labels, loss_mask=mask, return_logits=True)
    ref = naive_logits(model, tokens)[..., :V_TRUE]      # the padding columns are masked
    torch.testing.assert_close(out.logits[..., :V_TRUE], ref, atol=2e-5, rtol=1e-5)
    assert (out.logits[..., V_TRUE:] < -1e4).all()
    ce = F.cross_entropy(ref.reshape(B * S, -1), labels.reshape(-1), reduction="none").view(B, S)
    ref_loss = (ce * mask).sum() / mask.sum()
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.num_steps, torch.full((B, S), K)) and out.latent_loss == 0
    params = [p for p in model.parameters()]
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    want = torch.autograd.grad(ref_loss, params, allow_unused=True)
    for (name, _), a, e in zip(model.named_parameters(), got, want):
        assert (a is None) == (e is None), name
        if e is not None:
            assert ((a - e).abs().max() / e.abs().max().clamp_min(1e-6)) < 1e-4, name
    torch.testing.assert_close(out.exit_mass.sum(-1), torch.ones(B, S))


def test_embedding_scales_and_parameters():
    d = 64
    assert _model("loop").config.embed_scale == pytest.approx(math.sqrt(2.5 * d))
    assert _model("pause").config.embed_scale == pytest.approx(math.sqrt(d))
    assert _model("ponder").config.embed_scale == pytest.approx(math.sqrt(d))
    names = {m: {n for n, _ in _model(m).named_parameters() if n.startswith("latent.")}
             for m in ("loop", "pause", "ponder")}
    assert names == {"loop": set(), "pause": {"latent.pause_embedding"}, "ponder": set()}
    assert not _model("loop").latent.reuse_kv and not _model("ponder").latent.reuse_kv


def test_pause_is_causal_over_tokens():
    model = _model("pause")
    tokens, _, _ = _batch()
    changed = tokens.clone()
    changed[:, 4] = (changed[:, 4] + 1) % V_TRUE
    a, b = model(tokens).logits, model(changed).logits
    assert torch.equal(a[:, :4], b[:, :4]) and not torch.allclose(a[:, 4], b[:, 4])


def _gather(t, dim):
    world = parallel_state.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim)


def _run(tp, sp=False):
    tokens, labels, mask = _batch()
    res = {}
    for method in ("loop", "pause", "ponder"):
        cfg = preset("tiny-tp4", latent_method=method, latent_max_steps=K, seq_length=S,
                     vocab_size=V_TRUE)
        model = build_model(cfg, ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp))
        out = model(tokens, labels=labels, loss_mask=mask, return_logits=True)
        out.loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad
            if tp > 1 and getattr(p, "tensor_model_parallel", False):
                world = parallel_state.get_tensor_model_parallel_world_size()
                parts = [torch.empty_like(g) for _ in range(world)]
                dist.all_gather(parts, g.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
                g = merge_shards(parts, p.partition_dim, p.partition_stride)
            elif tp > 1 and getattr(p, "sequence_parallel", False):
                g = g.clone()
                dist.all_reduce(g, group=parallel_state.get_tensor_model_parallel_group())
            grads[name] = g
        logits = _gather(out.logits.detach(), -1) if tp > 1 else out.logits.detach()
        res[method] = dict(logits=logits, loss=out.loss.detach(), grads=grads)
    return res


def _worker(rank, world_size):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    buf = io.BytesIO()
    torch.save({sp: _run(world_size, sp) for sp in (False, True)}, buf)
    return buf.getvalue()


@pytest.mark.slow
def test_tensor_parallel_baselines_match_single_process():
    ref = _run(1)
    got = torch.load(io.BytesIO(run_distributed(_worker, 2)[0]), weights_only=True)
    for (sp, method), r in [((sp, m), r) for sp in (False, True) for m, r in ref.items()]:
        g = got[sp][method]
        torch.testing.assert_close(g["logits"], r["logits"], atol=2e-5, rtol=1e-5, msg=method)
        torch.testing.assert_close(g["loss"], r["loss"], atol=1e-6, rtol=1e-5, msg=method)
        for name, e in r["grads"].items():
            err = ((g["grads"][name] - e).abs().max() / e.abs().max().clamp_min(1e-6)).item()
            assert err < 1e-4, f"{method} sp={sp} grad {name}: rel err {err:.1e}"
