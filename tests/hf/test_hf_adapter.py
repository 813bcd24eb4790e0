"""hf_adapter mapping and the shipped llama_alcot remote code (against transformers' LLaMA, a naive
per-(t, k) ALCoT reference, cached decoding and the native model)."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_alcot.checkpointing.hf_adapter import (HFConversionError, from_hf, hf_config_from_model_config,
                                                     merge_qkv, model_config_from_hf_config, split_qkv, to_hf)
from megatron_alcot.config import ModelConfig
from megatron_alcot.hf.configuration_llama_alcot import LlamaAlcotConfig
from megatron_alcot.hf.modeling_llama_alcot import LatentCache, LlamaAlcotForCausalLM

V = 300


def small_cfg(**kw):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=V,
                ffn_hidden_size=96, rotary_base=500000.0, latent_threshold=0.3,
                untie_embeddings_and_output_weights=True)
    base.update(kw)
    return ModelConfig(**base)


def hf_kwargs(**kw):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5)
    base.update(kw)
    return base


def remote_from_native(model_cfg, native_sd):
    cfg = hf_config_from_model_config(model_cfg, {"bos_token_id": 1, "eos_token_id": 2})
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "auto_map")}
    m = LlamaAlcotForCausalLM(LlamaAlcotConfig(**cfg)).eval()
    m.load_state_dict(to_hf(native_sd, model_cfg), strict=not cfg["tie_word_embeddings"])
    if cfg["tie_word_embeddings"]:
        m.tie_weights()
    return m


def test_qkv_grouped_layout_round_trip():
    cfg = small_cfg()
    qkv = torch.randn((4 + 2 * 2) * 16, 64)
    q, k, v = split_qkv(qkv, cfg)
    assert q.shape == (64, 64) and k.shape == (32, 64)
    # group 0 = [q0 q1 k0 v0]
    assert torch.equal(q[:32], qkv[:32]) and torch.equal(k[:16], qkv[32:48]) and torch.equal(v[:16], qkv[48:64])
    assert torch.equal(merge_qkv(q, k, v, cfg), qkv)


@pytest.mark.parametrize("tied", [False, True])
def test_native_hf_native_round_trip(tied):
    from megatron_alcot.model import build_model
    cfg = small_cfg(untie_embeddings_and_output_weights=not tied)
    sd = build_model(cfg).state_dict()
    back = from_hf(to_hf(sd, cfg), cfg, padded_vocab_size=sd["embedding.word_embeddings.weight"].shape[0])
    assert set(back) == set(sd) - ({"output_layer.weight"} if tied else set())
    for name, t in back.items():
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert torch.equal(t[:V], sd[name][:V]) and not t[V:].any()
        else:
            assert torch.equal(t, sd[name]), name
    cfg2 = model_config_from_hf_config(hf_config_from_model_config(cfg))
    for f in ("num_layers", "hidden_size", "ffn_size", "query_groups", "head_dim", "rotary_base",
              "norm_epsilon", "untie_embeddings_and_output_weights", "latent_method", "latent_max_steps",
              "latent_threshold", "embed_scale"):
        assert getattr(cfg2, f) == getattr(cfg, f), f


def test_adapter_errors_name_the_tensor():
    cfg = small_cfg(latent_method="vanilla")
    hf = {"model.embed_tokens.weight": torch.zeros(V + 1, 64)}
    with pytest.raises(HFConversionError, match="vocab_size"):
        from_hf(hf, cfg)
    with pytest.raises(HFConversionError, match="decoder.layers.0"):
        to_hf({"embedding.word_embeddings.weight": torch.zeros(384, 64)}, cfg)


@pytest.mark.parametrize("method,steps", [("vanilla", 3), ("alcot", 0)])
def test_remote_code_equals_llama(method, steps):
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(**hf_kwargs())).eval()
    m = LlamaAlcotForCausalLM(LlamaAlcotConfig(latent_method=method, latent_max_steps=steps, **hf_kwargs())).eval()
    m.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        assert (ref(x).logits - m(x).logits).abs().max() <= 1e-5


def naive_alcot(m, ids):
    """Per (t, k) reference: entries run one at a time in (k, t) order with an explicit key list."""
    cfg = m.config
    L, tau, s = cfg.latent_max_steps, cfg.latent_threshold, cfg.embed_scale
    T = ids.shape[0]
    layers, norm = m.model.layers, m.model.norm
    keys = [[] for _ in layers]  # per layer: list of (t, k, key [kvh, d], value [kvh, d])
    h_prev = {t: m.model.embed_tokens.weight[ids[t]] * s for t in range(T)}
    reach = {t: 1.0 for t in range(T)}
    active = set(range(T))
    readout = {t: torch.zeros(cfg.hidden_size) for t in range(T)}
    steps = [0] * T
    for k in range(L + 1):
        new_h = {}
        for t in sorted(active):
            x = h_prev[t][None]
            cos, sin = m.model.rotary_emb(torch.tensor([[t]]))
            for i, layer in enumerate(layers):
                a = layer.self_attn
                xn = layer.input_layernorm(x)
                q = a.q_proj(xn).view(1, a.heads, a.d)
                kk = a.k_proj(xn).view(1, a.kv_heads, a.d)
                vv = a.v_proj(xn).view(1, a.kv_heads, a.d)
                rot = lambda z: z * cos[0, :, None] + torch.cat([-z[..., a.d // 2:], z[..., :a.d // 2]], -1) * sin[0, :, None]
                q, kk = rot(q), rot(kk)
                keys[i].append((t, k, kk[0], vv[0]))
                vis = [(kt, kv) for (tt, st, kt, kv) in keys[i] if tt <= t and st <= k]
                K = torch.stack([e[0] for e in vis]).repeat_interleave(a.heads // a.kv_heads, 1)
                Vv = torch.stack([e[1] for e in vis]).repeat_interleave(a.heads // a.kv_heads, 1)
                att = torch.softmax(torch.einsum("hd,nhd->hn", q[0], K) / math.sqrt(a.d), -1)
                o = torch.einsum("hn,nhd->hd", att, Vv).reshape(1, -1)
                x = x + a.o_proj(o)
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            new_h[t] = norm(x)[0]
        nxt = set()
        for t in sorted(active):
            h = new_h[t]
            if k < L:
                g = torch.sigmoid(m.latent.routers[k](h.float()))[0]
                r1 = reach[t] * g
                if r1 >= tau:
                    readout[t] = readout[t] + reach[t] * (1 - g) * h
                    nxt.add(t)
                    steps[t] += 1
                else:
                    readout[t] = readout[t] + reach[t] * h
                reach[t] = r1
            else:
                readout[t] = readout[t] + reach[t] * h
        h_prev, active = new_h, nxt
    return m.lm_head(torch.stack([readout[t] for t in range(T)])), torch.tensor(steps)


def alcot_remote(seed=0, **kw):
    torch.manual_seed(seed)
    m = LlamaAlcotForCausalLM(LlamaAlcotConfig(latent_method="alcot", latent_max_steps=3, latent_threshold=0.3,
                                               embed_scale=math.sqrt(2.5 * 64), **hf_kwargs(**kw))).eval()
    with torch.no_grad():
        for r in m.latent.routers:
            r.weight.normal_(0, 0.3)
    return m


def test_remote_alcot_matches_naive_per_entry_reference():
    m = alcot_remote()
    ids = torch.randint(0, V, (11,))
    with torch.no_grad():
        out = m(ids[None])
        ref_logits, ref_steps = naive_alcot(m, ids)
    assert 0 < ref_steps.sum() < 3 * 11, "halting should be mixed for this test to mean something"
    assert torch.equal(out.num_steps[0], ref_steps)
    assert (out.logits[0] - ref_logits).abs().max() <= 1e-4


@pytest.mark.parametrize("method", ["alcot", "loop", "pause", "ponder"])
def test_cached_decoding_equals_parallel_forward(method):
    m = alcot_remote() if method == "alcot" else LlamaAlcotForCausalLM(
        LlamaAlcotConfig(latent_method=method, latent_max_steps=2, embed_scale=2.0, **hf_kwargs())).eval()
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        full = m(ids)
        cache = LatentCache(2)
        part = m(ids[:, :4], cache=cache)
        logits, steps = [part.logits], [part.num_steps]
        for t in range(4, 9):
            o = m(ids[:, t:t + 1], cache=cache)
            logits.append(o.logits)
            steps.append(o.num_steps)
    assert (torch.cat(logits, 1) - full.logits).abs().max() <= 1e-4
    assert torch.equal(torch.cat(steps, 1), full.num_steps)
    if method == "alcot":
        assert cache.num_entries() == int((1 + full.num_steps).sum())  # exactly the executed (t, k)


def test_left_padded_batch_equals_single_rows():
    m = alcot_remote()
    a, b = torch.randint(0, V, (1, 7)), torch.randint(0, V, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():
        out = m(batch, attention_mask=mask)
        ob = m(b)
        gen = m.generate(batch, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True)
        gb = m.generate(b, max_new_tokens=4, return_dict_in_generate=True)
    assert (out.logits[1, 3:] - ob.logits[0]).abs().max() <= 1e-4
    assert torch.equal(gen.sequences[1, 7:], gb.sequences[0, 4:])
    assert torch.equal(gen.latent_steps[1], gb.latent_steps[0])


@pytest.mark.parametrize("tied", [False, True])
def test_remote_code_equals_native_model(tied):
    from megatron_alcot.model import build_model
    cfg = small_cfg(untie_embeddings_and_output_weights=not tied)
    native = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in native.named_parameters():
            if name.startswith("latent.routers.") and name.endswith("weight"):
                p.normal_(0, 0.3)
    remote = remote_from_native(cfg, native.state_dict())
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        o, oh = native(x), remote(x)
    assert torch.equal(o.num_steps, oh.num_steps)
    assert (o.logits[..., :V] - oh.logits).abs().max() <= 1e-4
