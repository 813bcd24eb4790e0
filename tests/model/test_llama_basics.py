"""The plain LLaMA: parameter names and init, equality with HF LlamaForCausalLM (grouped QKV,
[gate; up], rotate-half RoPE, RMSNorm eps), vanilla == ALCoT at ℓmax = 0 bit for bit, config
errors before compute, presets."""
import math

import pytest
import torch

from megatron_alcot.config import ConfigError, ParallelConfig
from megatron_alcot.model import build_model
from megatron_alcot.model.presets import PRESETS, preset

B, S = 2, 16


def _tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (B, S), generator=g), torch.randint(0, 250, (B, S), generator=g)


def test_parameter_names_and_init():
    cfg = preset("tiny", latent_max_steps=2, vocab_size=250)
    model = build_model(cfg)
    names = {n for n, _ in model.named_parameters()}
    expected = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"}
    for i in range(cfg.num_layers):
        expected |= {f"decoder.layers.{i}.{n}.weight" for n in (
            "input_layernorm", "self_attention.linear_qkv", "self_attention.linear_proj",
            "pre_mlp_layernorm", "mlp.linear_fc1", "mlp.linear_fc2")}
    expected |= {f"latent.routers.{k}.{w}" for k in range(2) for w in ("weight", "bias")}
    assert names == expected
    p = dict(model.named_parameters())
    std = cfg.init_std
    assert p["embedding.word_embeddings.weight"][250:].abs().sum() == 0       # vocab padding rows
    assert abs(p["embedding.word_embeddings.weight"][:250].std().item() / std - 1) < 0.1
    assert p["decoder.layers.0.self_attention.linear_qkv.weight"].abs().max() <= 3 * std + 1e-7
    proj = p["decoder.layers.0.mlp.linear_fc2.weight"].std().item()
    assert abs(proj / (std / math.sqrt(2 * cfg.num_layers)) - 1) < 0.1
    assert torch.equal(p["decoder.layers.1.pre_mlp_layernorm.weight"], torch.ones(64))
    assert p["latent.routers.1.weight"].abs().sum() == 0
    assert torch.sigmoid(p["latent.routers.1.bias"]).item() == pytest.approx(0.9, abs=1e-6)
    assert p["latent.routers.0.weight"].dtype == torch.float32
    # Names, not construction order, fix the weights: the same seed gives the same LLaMA weights
    # whatever the method, and layer slices (pipeline stages) hold exactly the same layers.
    vanilla = dict(build_model(preset("tiny", latent_method="vanilla", vocab_size=250)).named_parameters())
    stage = dict(build_model(cfg, pre_process=False, layer_range=(1, 2)).named_parameters())
    for n, t in vanilla.items():
        assert torch.equal(t, p[n]), n
    assert "decoder.layers.1.mlp.linear_fc1.weight" in stage and "decoder.layers.0.mlp.linear_fc1.weight" not in stage
    for n, t in stage.items():
        assert torch.equal(t, p[n]), n
    tied = build_model(preset("tiny", untie_embeddings_and_output_weights=False))
    assert "output_layer.weight" not in dict(tied.named_parameters())


def _to_hf(model, cfg):
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_cfg = LlamaConfig(
        vocab_size=cfg.padded_vocab_size(), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.query_groups,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_epsilon, rope_theta=cfg.rotary_base,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=not cfg.untie_embeddings_and_output_weights)
    hf = LlamaForCausalLM(hf_cfg).eval()
    p = {n: t.detach() for n, t in model.named_parameters()}
    ng, hpg, hd = cfg.query_groups, cfg.num_attention_heads // cfg.query_groups, cfg.head_dim
    sd = {"model.embed_tokens.weight": p["embedding.word_embeddings.weight"],
          "model.norm.weight": p["decoder.final_layernorm.weight"]}
    if cfg.untie_embeddings_and_output_weights:
        sd["lm_head.weight"] = p["output_layer.weight"]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = p[m + "self_attention.linear_qkv.weight"].view(ng, hpg + 2, hd, -1)
        sd[h + "self_attn.q_proj.weight"] = qkv[:, :hpg].reshape(-1, cfg.hidden_size)
        sd[h + "self_attn.k_proj.weight"] = qkv[:, hpg].reshape(-1, cfg.hidden_size)
        sd[h + "self_attn.v_proj.weight"] = qkv[:, hpg + 1].reshape(-1, cfg.hidden_size)
        sd[h + "self_attn.o_proj.weight"] = p[m + "self_attention.linear_proj.weight"]
        gate, up = p[m + "mlp.linear_fc1.weight"].chunk(2)
        sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"] = gate, up
        sd[h + "mlp.down_proj.weight"] = p[m + "mlp.linear_fc2.weight"]
        sd[h + "input_layernorm.weight"] = p[m + "input_layernorm.weight"]
        sd[h + "post_attention_layernorm.weight"] = p[m + "pre_mlp_layernorm.weight"]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    return hf


@pytest.mark.parametrize("untie", [True, False])
@torch.no_grad()
def test_vanilla_matches_hf_llama(untie):
    pytest.importorskip("transformers")
    cfg = preset("tiny", latent_method="vanilla", rotary_base=500000.0, norm_epsilon=1e-5,
                 untie_embeddings_and_output_weights=untie)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so the checks see them
        for n, t in model.named_parameters():
            if n.endswith("layernorm.weight"):
                t.uniform_(0.5, 1.5)
    hf = _to_hf(model, cfg)
    tokens, labels = _tokens()
    ours = model(tokens).logits
    theirs = hf(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_lmax0_is_bitwise_vanilla():
    tokens, labels = _tokens(1)
    mask = (torch.rand(B, S, generator=torch.Generator().manual_seed(3)) > 0.3).float()
    scale = math.sqrt(2.5 * 64)
    vanilla = build_model(preset("tiny", latent_method="vanilla", latent_embed_scale=scale))
    v = vanilla(tokens, labels=labels, loss_mask=mask, return_logits=True)
    # Same embed scale: ALCoT with ℓmax = 0, and ALCoT with ℓmax = 3 whose routers never continue.
    for cfg, halting in [(preset("tiny", latent_max_steps=0), "learned"),
                         (preset("tiny", latent_max_steps=3), "always")]:
        a = build_model(cfg)(tokens, labels=labels, loss_mask=mask, return_logits=True, halting=halting)
        assert torch.equal(a.logits, v.logits) and torch.equal(a.loss, v.loss)
        assert torch.equal(a.lm_loss, v.lm_loss) and a.latent_loss == 0
        assert a.num_steps.sum() == 0 and torch.equal(a.exit_mass[..., 0], torch.ones(B, S))
    # The default vanilla embed scale is 1 (the stock HF LLaMA).
    assert preset("tiny", latent_method="vanilla").embed_scale == 1.0


def test_config_errors_before_compute():
    bad = [dict(hidden_size=60, num_attention_heads=8), dict(num_query_groups=3),
           dict(latent_method="nope"), dict(latent_threshold=1.5), dict(latent_embed_scale=-1.0),
           dict(norm_epsilon=0.0), dict(hidden_dropout=1.0), dict(init_method_std=0.0),
           dict(rotary_base=0.0), dict(latent_readout="max")]
    for kw in bad:
        with pytest.raises(ConfigError):
            build_model(preset("tiny", **kw))
    with pytest.raises(ConfigError):
        build_model(preset("tiny"), ParallelConfig(tensor_model_parallel_size=4))  # 2 KV heads
    with pytest.raises(ConfigError):
        build_model(preset("tiny"), layer_range=(1, 5))


def test_presets():
    for name in PRESETS:
        preset(name).validate()
    c = preset("410m")
    assert (c.hidden_size, c.num_layers, c.num_attention_heads, c.ffn_size) == (1024, 24, 16, 2752)
    c = preset("1.4b")
    assert (c.hidden_size, c.num_layers, c.num_attention_heads, c.ffn_size) == (2048, 24, 32, 5504)
    assert c.untie_embeddings_and_output_weights
    c = preset("7b")
    assert (c.hidden_size, c.num_layers, c.ffn_size, c.vocab_size) == (4096, 32, 11008, 32000)
    with pytest.raises(KeyError):
        preset("13b")
