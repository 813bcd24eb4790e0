"""The one key mapping between a full (TP = PP = 1) native state dict and Hugging Face LLaMA.

    from megatron_alcot.checkpointing.hf_adapter import (
        to_hf, from_hf, hf_config_from_model_config, model_config_from_hf_config)
    hf_sd = to_hf(full_sd, model_cfg)                      # native -> HF names, vocab padding stripped
    full_sd = from_hf(hf_sd, model_cfg, padded_vocab_size=model_cfg.padded_vocab_size(tp=2))
    config_json = hf_config_from_model_config(model_cfg, {"bos_token_id": 1, "eos_token_id": 2})
    model_cfg = model_config_from_hf_config(config_json)

Mapping (native = Megatron-core names, docs/architecture.md):

    embedding.word_embeddings.weight [Vp, h]          model.embed_tokens.weight [V, h]
    decoder.layers.i.input_layernorm.weight           model.layers.i.input_layernorm.weight
    decoder.layers.i.self_attention.linear_qkv.weight model.layers.i.self_attn.{q,k,v}_proj.weight
        grouped rows [q_0..q_{hpg-1} k v] per query group (GQA: ng = num_key_value_heads)
    decoder.layers.i.self_attention.linear_proj       model.layers.i.self_attn.o_proj
    decoder.layers.i.pre_mlp_layernorm.weight         model.layers.i.post_attention_layernorm.weight
    decoder.layers.i.mlp.linear_fc1.weight [gate; up] model.layers.i.mlp.{gate,up}_proj.weight
    decoder.layers.i.mlp.linear_fc2.weight            model.layers.i.mlp.down_proj.weight
    decoder.final_layernorm.weight                    model.norm.weight
    output_layer.weight [Vp, h]                       lm_head.weight [V, h] (absent when tied)
    latent.*  (routers, pause embedding)              latent.*  (same names; llama_alcot only)

The vocabulary padding (rows V..Vp-1, ``--make-vocab-size-divisible-by`` × TP) is stripped on export
and re-added as zero rows on import, using the true vocabulary size ``model_cfg.vocab_size``.

A plain ``LlamaForCausalLM`` has no input-embedding scale. ``to_hf(..., base_only=True)`` therefore
folds the step-0 scale ``s`` (``model_cfg.embed_scale``) into ``embed_tokens`` (and unties a tied
head, since the head must keep the unscaled matrix); with ``s == 1`` it is a pure relabelling.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional

import torch

from megatron_alcot.config import ModelConfig

NATIVE_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
LATENT_PREFIX = "latent."
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)

# native per-layer suffix -> HF per-layer suffix, for the tensors that are a pure rename
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_QKV = "self_attention.linear_qkv.weight"
_FC1 = "mlp.linear_fc1.weight"

HF_MODEL_TYPE_ALCOT = "llama_alcot"
HF_LATENT_FIELDS = ("latent_method", "latent_max_steps", "latent_threshold", "latent_router_init_prob",
                    "latent_loss_weight", "latent_loss_beta", "latent_loss_scope", "latent_readout",
                    "latent_embed_scale")


class HFConversionError(ValueError):
    """A state dict or config does not fit the native <-> HF LLaMA mapping; the message says why."""


def _is_base_only(model_cfg: ModelConfig) -> bool:
    return model_cfg.latent_method == "vanilla" and model_cfg.embed_scale == 1.0


def exports_as_plain_llama(model_cfg: ModelConfig, base_only: bool = False) -> bool:
    """True when the export is a stock ``LlamaForCausalLM`` (model_type ``llama``)."""
    return base_only or _is_base_only(model_cfg)


# ----------------------------------------------------------------------------- fused tensors
def split_qkv(qkv: torch.Tensor, model_cfg: ModelConfig):
    """Grouped ``[ng·(hpg+2)·hd, h]`` -> ``(q [nh·hd, h], k [ng·hd, h], v [ng·hd, h])``."""
    ng, hd = model_cfg.query_groups, model_cfg.head_dim
    hpg = model_cfg.num_attention_heads // ng
    expected = ng * (hpg + 2) * hd
    if qkv.dim() != 2 or qkv.shape[0] != expected:
        raise HFConversionError(f"linear_qkv has shape {tuple(qkv.shape)}, expected [{expected}, hidden] for "
                                f"{model_cfg.num_attention_heads} heads, {ng} query groups, head dim {hd}")
    grouped = qkv.reshape(ng, hpg + 2, hd, qkv.shape[1])
    q = grouped[:, :hpg].reshape(ng * hpg * hd, -1)
    k = grouped[:, hpg].reshape(ng * hd, -1)
    v = grouped[:, hpg + 1].reshape(ng * hd, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model_cfg: ModelConfig) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    ng, hd, nh = model_cfg.query_groups, model_cfg.head_dim, model_cfg.num_attention_heads
    hpg = nh // ng
    for name, t, rows in (("q_proj", q, nh * hd), ("k_proj", k, ng * hd), ("v_proj", v, ng * hd)):
        if t.dim() != 2 or t.shape[0] != rows:
            raise HFConversionError(f"{name} has shape {tuple(t.shape)}, expected [{rows}, hidden] "
                                    f"({nh} heads, {ng} key/value heads, head dim {hd})")
    h = q.shape[1]
    grouped = torch.cat([q.reshape(ng, hpg, hd, h), k.reshape(ng, 1, hd, h), v.reshape(ng, 1, hd, h)], dim=1)
    return grouped.reshape(ng * (hpg + 2) * hd, h).contiguous()


def split_fc1(fc1: torch.Tensor, model_cfg: ModelConfig):
    """``[gate; up]`` ``[2·ffn, h]`` -> ``(gate, up)``."""
    if fc1.dim() != 2 or fc1.shape[0] != 2 * model_cfg.ffn_size:
        raise HFConversionError(f"linear_fc1 has shape {tuple(fc1.shape)}, expected "
                                f"[{2 * model_cfg.ffn_size}, hidden] ([gate; up] with ffn {model_cfg.ffn_size})")
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def _strip_vocab(t: torch.Tensor, vocab: int, name: str) -> torch.Tensor:
    if t.shape[0] < vocab:
        raise HFConversionError(f"{name} has {t.shape[0]} rows, fewer than the true vocabulary size {vocab}")
    return t[:vocab].contiguous()


def _pad_vocab(t: torch.Tensor, padded: int, name: str) -> torch.Tensor:
    if t.shape[0] > padded:
        raise HFConversionError(f"{name} has {t.shape[0]} rows, more than the padded vocabulary size {padded}; "
                                "the config's vocab_size disagrees with the weights")
    if t.shape[0] == padded:
        return t.contiguous()
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


# ----------------------------------------------------------------------------- state dicts
def to_hf(full_sd: Mapping[str, torch.Tensor], model_cfg: ModelConfig, *,
          base_only: bool = False) -> Dict[str, torch.Tensor]:
    """Full native state dict -> HF ``LlamaForCausalLM`` (or llama_alcot) state dict.

    ``base_only`` drops the latent parameters and folds the embedding scale (plain LLaMA export).
    Raises :class:`HFConversionError` on a missing, unexpected or mis-shaped tensor.
    """
    sd = dict(full_sd)
    vocab = model_cfg.vocab_size
    out: Dict[str, torch.Tensor] = {}
    consumed = set()

    def take(name):
        if name not in sd:
            raise HFConversionError(f"the native state dict has no {name!r}; is the checkpoint complete "
                                    f"(all pipeline stages) and for {model_cfg.num_layers} layers?")
        consumed.add(name)
        return sd[name]

    embed = _strip_vocab(take("embedding.word_embeddings.weight"), vocab, "embedding.word_embeddings.weight")
    tied = not model_cfg.untie_embeddings_and_output_weights
    scale = model_cfg.embed_scale if base_only else 1.0
    if scale != 1.0:
        out["model.embed_tokens.weight"] = (embed.float() * scale).to(embed.dtype)
        out["lm_head.weight"] = embed if tied else None  # filled below when untied
    else:
        out["model.embed_tokens.weight"] = embed
    for i in range(model_cfg.num_layers):
        pre, hpre = f"decoder.layers.{i}.", f"model.layers.{i}."
        for nsuf, hsuf in _LAYER_RENAMES.items():
            out[hpre + hsuf] = take(pre + nsuf).contiguous()
        q, k, v = split_qkv(take(pre + _QKV), model_cfg)
        out[hpre + "self_attn.q_proj.weight"] = q
        out[hpre + "self_attn.k_proj.weight"] = k
        out[hpre + "self_attn.v_proj.weight"] = v
        gate, up = split_fc1(take(pre + _FC1), model_cfg)
        out[hpre + "mlp.gate_proj.weight"] = gate
        out[hpre + "mlp.up_proj.weight"] = up
    out["model.norm.weight"] = take("decoder.final_layernorm.weight").contiguous()
    if not tied:
        out["lm_head.weight"] = _strip_vocab(take("output_layer.weight"), vocab, "output_layer.weight")
    elif "output_layer.weight" in sd:
        consumed.add("output_layer.weight")  # a tied copy; the HF side ties it again
    for name in sd:
        if name.startswith(LATENT_PREFIX):
            consumed.add(name)
            if not base_only:
                out[name] = sd[name].contiguous()
    unexpected = sorted(n for n in sd if n not in consumed and not n.endswith("_extra_state"))
    if unexpected:
        raise HFConversionError(f"the native state dict has tensors with no HF name: {unexpected[:8]}"
                                f"{' ...' if len(unexpected) > 8 else ''}")
    if "lm_head.weight" in out and out["lm_head.weight"] is None:
        del out["lm_head.weight"]
    return out


def from_hf(hf_sd: Mapping[str, torch.Tensor], model_cfg: ModelConfig, *,
            padded_vocab_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """HF LLaMA (or llama_alcot) state dict -> full native state dict.

    The vocabulary is re-padded with zero rows to ``padded_vocab_size`` (default: the padding for
    TP = 1). Latent parameters present in ``hf_sd`` are passed through; missing ones are the
    caller's to initialise. ``rotary_emb.inv_freq`` buffers are ignored.
    """
    sd = {k: v for k, v in hf_sd.items() if not k.endswith(IGNORED_HF_SUFFIXES)}
    padded = padded_vocab_size or model_cfg.padded_vocab_size(1)
    vocab = model_cfg.vocab_size
    consumed = set()
    out: Dict[str, torch.Tensor] = {}

    def take(name):
        if name not in sd:
            raise HFConversionError(f"the HF state dict has no {name!r} (expected a LlamaForCausalLM with "
                                    f"{model_cfg.num_layers} layers)")
        consumed.add(name)
        return sd[name]

    embed = take("model.embed_tokens.weight")
    if embed.shape[0] != vocab:
        raise HFConversionError(f"model.embed_tokens.weight has {embed.shape[0]} rows but the config's "
                                f"vocab_size is {vocab}")
    out["embedding.word_embeddings.weight"] = _pad_vocab(embed, padded, "model.embed_tokens.weight")
    for i in range(model_cfg.num_layers):
        pre, hpre = f"decoder.layers.{i}.", f"model.layers.{i}."
        for nsuf, hsuf in _LAYER_RENAMES.items():
            out[pre + nsuf] = take(hpre + hsuf).contiguous()
        out[pre + _QKV] = merge_qkv(take(hpre + "self_attn.q_proj.weight"), take(hpre + "self_attn.k_proj.weight"),
                                    take(hpre + "self_attn.v_proj.weight"), model_cfg)
        gate, up = take(hpre + "mlp.gate_proj.weight"), take(hpre + "mlp.up_proj.weight")
        if gate.shape != up.shape or gate.shape[0] != model_cfg.ffn_size:
            raise HFConversionError(f"{hpre}mlp.gate_proj/up_proj have shapes {tuple(gate.shape)}/"
                                    f"{tuple(up.shape)}, expected [{model_cfg.ffn_size}, hidden]")
        out[pre + _FC1] = torch.cat([gate, up], dim=0).contiguous()
    out["decoder.final_layernorm.weight"] = take("model.norm.weight").contiguous()
    if model_cfg.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = _pad_vocab(take("lm_head.weight"), padded, "lm_head.weight")
    elif "lm_head.weight" in sd:
        consumed.add("lm_head.weight")
        if not torch.equal(sd["lm_head.weight"], embed):
            raise HFConversionError("tie_word_embeddings is true but lm_head.weight differs from "
                                    "model.embed_tokens.weight")
    for name in sd:
        if name.startswith(LATENT_PREFIX):
            consumed.add(name)
            out[name] = sd[name].contiguous()
    unexpected = sorted(n for n in sd if n not in consumed)
    if unexpected:
        raise HFConversionError(f"the HF state dict has tensors this LLaMA mapping does not know: "
                                f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    return out


# ----------------------------------------------------------------------------- configs
def hf_config_from_model_config(model_cfg: ModelConfig, tokenizer_info: Optional[Mapping] = None, *,
                                base_only: bool = False, dtype: str = "float32") -> dict:
    """``config.json`` contents for the export (plain ``llama`` or ``llama_alcot``).

    ``tokenizer_info``: optional ``bos_token_id``, ``eos_token_id``, ``pad_token_id``.
    """
    tok = dict(tokenizer_info or {})
    plain = exports_as_plain_llama(model_cfg, base_only)
    tied = not model_cfg.untie_embeddings_and_output_weights
    if base_only and model_cfg.embed_scale != 1.0:
        tied = False  # the folded embedding differs from the head (see to_hf)
    theta = float(model_cfg.rotary_base)
    cfg = {
        "architectures": ["LlamaForCausalLM" if plain else "LlamaAlcotForCausalLM"],
        "model_type": "llama" if plain else HF_MODEL_TYPE_ALCOT,
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.hidden_size,
        "intermediate_size": model_cfg.ffn_size,
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_attention_heads,
        "num_key_value_heads": model_cfg.query_groups,
        "head_dim": model_cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model_cfg.max_positions,
        "initializer_range": model_cfg.init_std,
        "rms_norm_eps": model_cfg.norm_epsilon,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": model_cfg.attention_dropout,
        "pretraining_tp": 1,
        "use_cache": True,
        "rope_theta": theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "bos_token_id": tok.get("bos_token_id"),
        "eos_token_id": tok.get("eos_token_id"),
        "pad_token_id": tok.get("pad_token_id"),
        "torch_dtype": dtype,
    }
    if not plain:
        for name in HF_LATENT_FIELDS:
            cfg[name] = getattr(model_cfg, name)
        cfg["embed_scale"] = model_cfg.embed_scale
        cfg["make_vocab_size_divisible_by"] = model_cfg.make_vocab_size_divisible_by
        cfg["auto_map"] = {
            "AutoConfig": "configuration_llama_alcot.LlamaAlcotConfig",
            "AutoModelForCausalLM": "modeling_llama_alcot.LlamaAlcotForCausalLM",
        }
    return cfg


def _rope_theta(hf_cfg: Mapping) -> float:
    params = hf_cfg.get("rope_parameters") or {}
    if isinstance(params, Mapping) and "rope_theta" in params:
        if params.get("rope_type", "default") != "default":
            raise HFConversionError(f"rope type {params.get('rope_type')!r} is not supported; only the "
                                    "default (unscaled) RoPE maps onto --rotary-base")
        return float(params["rope_theta"])
    if hf_cfg.get("rope_scaling"):
        raise HFConversionError(f"rope_scaling {hf_cfg['rope_scaling']!r} is not supported; only unscaled RoPE")
    return float(hf_cfg.get("rope_theta", 10000.0))


def model_config_from_hf_config(hf_cfg: Mapping, **overrides) -> ModelConfig:
    """Inverse of :func:`hf_config_from_model_config` (a ``config.json`` dict -> ModelConfig).

    A plain ``llama`` config gives ``latent_method="vanilla"``; ``overrides`` (e.g.
    ``latent_method="alcot", latent_max_steps=3``) are applied last.
    """
    model_type = hf_cfg.get("model_type")
    if model_type not in ("llama", HF_MODEL_TYPE_ALCOT):
        raise HFConversionError(f"model_type {model_type!r} is not a LLaMA; expected 'llama' or "
                                f"'{HF_MODEL_TYPE_ALCOT}'")
    if hf_cfg.get("hidden_act", "silu") != "silu":
        raise HFConversionError(f"hidden_act {hf_cfg['hidden_act']!r} is not supported (LLaMA uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf_cfg.get(flag):
            raise HFConversionError(f"{flag}=true is not supported: the native LLaMA has no linear biases")
    heads = int(hf_cfg["num_attention_heads"])
    hidden = int(hf_cfg["hidden_size"])
    head_dim = int(hf_cfg.get("head_dim") or hidden // heads)
    kw = dict(
        num_layers=int(hf_cfg["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(hf_cfg["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf_cfg.get("num_key_value_heads") or heads),
        kv_channels=head_dim,
        vocab_size=int(hf_cfg["vocab_size"]),
        max_position_embeddings=int(hf_cfg.get("max_position_embeddings", 2048)),
        rotary_base=_rope_theta(hf_cfg),
        norm_epsilon=float(hf_cfg.get("rms_norm_eps", 1e-6)),
        untie_embeddings_and_output_weights=not bool(hf_cfg.get("tie_word_embeddings", False)),
        init_method_std=float(hf_cfg.get("initializer_range", 0.02)),
        attention_dropout=float(hf_cfg.get("attention_dropout", 0.0) or 0.0),
        latent_method="vanilla",
    )
    kw["seq_length"] = min(kw["max_position_embeddings"], ModelConfig.seq_length)
    if model_type == HF_MODEL_TYPE_ALCOT:
        for name in HF_LATENT_FIELDS:
            if name in hf_cfg:
                kw[name] = hf_cfg[name]
        if "make_vocab_size_divisible_by" in hf_cfg:
            kw["make_vocab_size_divisible_by"] = int(hf_cfg["make_vocab_size_divisible_by"])
    else:
        kw["latent_embed_scale"] = 1.0  # a stock LLaMA has no input-embedding scale
    kw.update(overrides)
    return ModelConfig(**kw)
