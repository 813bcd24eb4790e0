"""Hugging Face model of a megatron_alcot export: LLaMA with latent steps (``model_type: llama_alcot``).

Shipped into export directories with ``configuration_llama_alcot.py`` and loaded through ``auto_map``:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("hf_out", trust_remote_code=True, dtype="float32")
    out = model(input_ids)                  # out.logits [b, s, V]; out.num_steps [b, s] latent steps ℓ_t
    gen = model.generate(input_ids, max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    gen.sequences, gen.latent_steps         # latent steps used by each generated token

Self-contained (imports only torch and transformers) and implementing the native forward:

* alcot: step 0 is a causal LM pass on ``s·E[x]``; step k ≥ 1 feeds back the final-norm output of step
  k-1 at the same RoPE position; query (t, k) attends to executed keys (t', k') with t' ≤ t, k' ≤ k;
  router ``g = sigmoid(w_k·h + b_k)`` (fp32), reach ``r_{k+1} = r_k·g``, step k+1 runs iff
  ``k+1 ≤ ℓmax`` and ``r_{k+1} ≥ τ``; readout ``Σ_k e_k h_k`` (exit masses) or the exit-mass mixture
  of per-step distributions (``latent_readout="prob"``).
* loop: the layer stack applied K+1 times (no final norm in between), keys of the same pass only.
* pause: K pause slots after every token at the token's position, one causal pass over the expanded
  sequence, logits read at the last pause slot.
* ponder: K+1 passes; pass j+1's input is ``s·E[x] + softmax(W_U h_j)·(s·E)``.
* vanilla: a plain LLaMA (with the embedding scale of the config).

The KV cache (:class:`LatentCache`) holds one entry per executed (token, step) with its position and
step; for batch size one it holds exactly the executed entries. ``generate`` is this module's own
loop (greedy, temperature / top-k / top-p sampling, EOS, stopping criteria) so that decoding follows
the same halting rule as the parallel forward.
"""
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .configuration_llama_alcot import LlamaAlcotConfig


# ----------------------------------------------------------------------------- cache
class LatentCache:
    """Keys/values of every executed (token, step) entry, per layer, with the entries' metadata.

    ``pos``/``step``/``valid`` are ``[b, N]``; ``keys[i]``/``values[i]`` are ``[b, kv_heads, N, d]``.
    Entries that are not executed for a batch row (padding, halted rows of a wider batch) are kept
    with ``valid=False`` and never attended to.
    """

    def __init__(self, num_layers: int):
        self.keys: List[Optional[torch.Tensor]] = [None] * num_layers
        self.values: List[Optional[torch.Tensor]] = [None] * num_layers
        self.pos: Optional[torch.Tensor] = None
        self.step: Optional[torch.Tensor] = None
        self.valid: Optional[torch.Tensor] = None
        self.num_tokens = 0          # tokens (not entries) seen so far, including padding

    def add_entries(self, pos, step, valid) -> int:
        """Register ``n`` new entries; returns the index of the first one."""
        offset = 0 if self.pos is None else self.pos.shape[1]
        if self.pos is None:
            self.pos, self.step, self.valid = pos, step, valid
        else:
            self.pos = torch.cat([self.pos, pos], dim=1)
            self.step = torch.cat([self.step, step], dim=1)
            self.valid = torch.cat([self.valid, valid], dim=1)
        return offset

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def num_entries(self) -> int:
        """Executed entries over the batch (per layer)."""
        return 0 if self.valid is None else int(self.valid.sum())

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.num_tokens


def visible_keys(method: str, q_pos, q_step, k_pos, k_step):
    """``[b, n, N]`` bool: which key entries each query entry may attend to (before validity)."""
    qp, qs = q_pos[:, :, None], q_step[:, :, None]
    kp, ks = k_pos[:, None, :], k_step[:, None, :]
    if method == "alcot" or method == "vanilla":
        return (kp <= qp) & (ks <= qs)
    if method in ("loop", "ponder"):
        return (kp <= qp) & (ks == qs)
    if method == "pause":
        return (kp < qp) | ((kp == qp) & (ks <= qs))
    raise ValueError(f"unknown latent_method {method!r}")


# ----------------------------------------------------------------------------- blocks
class LlamaAlcotRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LlamaAlcotRotary(nn.Module):
    """Rotate-half RoPE tables. Frequencies are computed on the fly (no buffer), so loading on the
    meta device cannot leave them uninitialised."""

    def __init__(self, config):
        super().__init__()
        params = getattr(config, "rope_parameters", None) or {}
        self.theta = float(params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))
        self.dim = config.head_dim

    @torch.no_grad()
    def forward(self, pos):
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=pos.device).float() / self.dim
        inv_freq = 1.0 / (self.theta ** exponents)
        freqs = pos.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x, cos, sin):
    """x ``[b, n, heads, d]``, cos/sin ``[b, n, d]``."""
    cos, sin = cos.to(x.dtype).unsqueeze(2), sin.to(x.dtype).unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


class LlamaAlcotAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.heads * self.d, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * self.d, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * self.d, bias=False)
        self.o_proj = nn.Linear(self.heads * self.d, h, bias=False)

    def forward(self, x, cos, sin, allowed, cache: LatentCache):
        b, n, _ = x.shape
        q = _apply_rotary(self.q_proj(x).view(b, n, self.heads, self.d), cos, sin).transpose(1, 2)
        k = _apply_rotary(self.k_proj(x).view(b, n, self.kv_heads, self.d), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.d).transpose(1, 2)
        keys, values = cache.update(self.layer_idx, k, v)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[:, None],
                                             enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.d))


class LlamaAlcotMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaAlcotDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.input_layernorm = LlamaAlcotRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAlcotAttention(config, layer_idx)
        self.post_attention_layernorm = LlamaAlcotRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaAlcotMLP(config)

    def forward(self, x, cos, sin, allowed, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaAlcotLatent(nn.Module):
    """Latent parameters: one fp32 router ``h -> 1`` per step k < ℓmax (alcot), a pause embedding."""

    def __init__(self, config):
        super().__init__()
        steps = config.max_latent_steps
        if config.latent_method == "alcot":
            self.routers = nn.ModuleList(nn.Linear(config.hidden_size, 1, dtype=torch.float32)
                                         for _ in range(steps))
        if config.latent_method == "pause":
            self.pause_embedding = nn.Parameter(torch.zeros(config.hidden_size))


def _router_prob(router: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """``sigmoid(w·h + b)`` in fp32 whatever the model's dtype or an enclosing autocast: in bf16, g
    at init would be 0.90234375, not 0.9, and ``1 - g`` (the exit mass) loses most of its bits."""
    with torch.autocast(h.device.type, enabled=False):
        logit = F.linear(h.float(), router.weight.float(), router.bias.float())
        return torch.sigmoid(logit.squeeze(-1))


# ----------------------------------------------------------------------------- models
class LlamaAlcotPreTrainedModel(PreTrainedModel):
    config_class = LlamaAlcotConfig
    config: LlamaAlcotConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LlamaAlcotDecoderLayer"]
    _keep_in_fp32_modules = ["latent"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, LlamaAlcotLatent):
            p = float(self.config.latent_router_init_prob)
            for router in getattr(module, "routers", []):
                router.weight.zero_()
                router.bias.fill_(math.log(p / (1.0 - p)))
            if hasattr(module, "pause_embedding"):
                module.pause_embedding.normal_(0.0, std)
        elif isinstance(module, nn.Linear) and module.out_features != 1:
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, LlamaAlcotRMSNorm):
            module.weight.fill_(1.0)


class LlamaAlcotModel(LlamaAlcotPreTrainedModel):
    """Embedding, decoder stack and final norm; ``run_stack`` is one pass over a set of entries."""

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaAlcotDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaAlcotRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaAlcotRotary(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def run_stack(self, x, pos, step, valid, cache: LatentCache, final_norm: bool = True):
        """Run entries ``x [b, n, h]`` (positions, steps, validity ``[b, n]``) through every layer."""
        method = self.config.latent_method
        offset = cache.add_entries(pos, step, valid)
        allowed = visible_keys(method, pos, step, cache.pos, cache.step) & cache.valid[:, None, :]
        n = x.shape[1]
        own = torch.arange(n, device=x.device)
        allowed[:, own, offset + own] = True   # padding / halted rows see themselves (outputs unused)
        cos, sin = self.rotary_emb(pos)
        for layer in self.layers:
            x = layer(x, cos, sin, allowed, cache)
        return self.norm(x) if final_norm else x


@dataclass
class LlamaAlcotOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``num_steps [b, s]``: latent steps each token executed."""

    num_steps: Optional[torch.LongTensor] = None


@dataclass
class LlamaAlcotGenerateOutput(ModelOutput):
    """``sequences [b, prompt + new]`` and ``latent_steps [b, new]`` (-1 after a row finished)."""

    sequences: Optional[torch.LongTensor] = None
    latent_steps: Optional[torch.LongTensor] = None
    cache: Optional[LatentCache] = None


# transformers 5 names the cache field ``cache``; earlier releases ``past_key_values``
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class LlamaAlcotForCausalLM(LlamaAlcotPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaAlcotModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.latent = LlamaAlcotLatent(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # ------------------------------------------------------------------ the latent forward
    def _scaled_embed(self, input_ids):
        e = self.model.embed_tokens(input_ids)
        s = float(self.config.embed_scale)
        return e * s if s != 1.0 else e

    def _latent_forward(self, input_ids, token_valid, pos, cache):
        """Returns (logits ``[b, T, V]``, num_steps ``[b, T]``) for the new tokens ``input_ids``."""
        cfg, method = self.config, self.config.latent_method
        steps = cfg.max_latent_steps
        b, T = input_ids.shape
        u = self._scaled_embed(input_ids)
        zeros = torch.zeros_like(input_ids)
        if method == "vanilla":
            h = self.model.run_stack(u, pos, zeros, token_valid, cache)
            return self.lm_head(h), zeros
        full = torch.full_like(input_ids, steps)
        if method == "loop":
            x = u
            for k in range(steps + 1):
                x = self.model.run_stack(x, pos, zeros + k, token_valid, cache, final_norm=False)
            return self.lm_head(self.model.norm(x)), full
        if method == "ponder":
            table = self.model.embed_tokens.weight
            table = table * float(cfg.embed_scale) if float(cfg.embed_scale) != 1.0 else table
            x = u
            for k in range(steps + 1):
                h = self.model.run_stack(x, pos, zeros + k, token_valid, cache)
                logits = self.lm_head(h)
                if k < steps:
                    x = u + torch.softmax(logits.float(), dim=-1).to(table.dtype) @ table
            return logits, full
        if method == "pause":
            slots = steps + 1
            pause = self.latent.pause_embedding.to(u.dtype).expand(b, T, steps, -1)
            x = torch.cat([u[:, :, None], pause], dim=2).reshape(b, T * slots, -1)
            step = torch.arange(slots, device=u.device).repeat(T)[None].expand(b, -1)
            h = self.model.run_stack(x, pos.repeat_interleave(slots, 1), step,
                                     token_valid.repeat_interleave(slots, 1), cache)
            return self.lm_head(h.view(b, T, slots, -1)[:, :, -1]), full
        return self._alcot_forward(u, token_valid, pos, cache)

    def _alcot_forward(self, u, token_valid, pos, cache):
        cfg = self.config
        steps, tau = cfg.max_latent_steps, float(cfg.latent_threshold)
        b, T, hdim = u.shape
        active = token_valid.clone()
        reach = torch.ones(b, T, dtype=torch.float32, device=u.device)
        num_steps = torch.zeros(b, T, dtype=torch.long, device=u.device)
        readout = None
        for k in range(steps + 1):
            if k == 0:
                idx = torch.arange(T, device=u.device)
            else:
                idx = active.any(0).nonzero().squeeze(-1)
                if idx.numel() == 0:
                    break
            rows = self.model.run_stack(u[:, idx], pos[:, idx], torch.full_like(pos[:, idx], k),
                                        active[:, idx], cache)
            h = u.new_zeros(b, T, hdim).index_copy(1, idx, rows)
            if k < steps:
                g = _router_prob(self.latent.routers[k], h)
                r_next = reach * g
                cont = active & (r_next >= tau)
                exit_mass = torch.where(active, torch.where(cont, reach * (1.0 - g), reach), 0.0)
                reach = r_next
            else:
                cont = torch.zeros_like(active)
                exit_mass = torch.where(active, reach, 0.0)
            if cfg.latent_readout == "prob":
                term = exit_mass[..., None] * torch.softmax(self.lm_head(h).float(), dim=-1)
            else:
                term = exit_mass[..., None] * h.float()      # fp32 readout weights and sum
            readout = term if readout is None else readout + term
            num_steps = num_steps + cont.long()
            active = cont
            u = h
        if cfg.latent_readout == "prob":
            return torch.log(readout.clamp_min(torch.finfo(readout.dtype).tiny)), num_steps
        return self.lm_head(readout.to(self.lm_head.weight.dtype)), num_steps

    # ------------------------------------------------------------------ HF API
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, return_dict=None,
                past_key_values=None, **kwargs):
        if input_ids is None:
            raise ValueError("LlamaAlcotForCausalLM needs input_ids (inputs_embeds is not supported: "
                             "latent steps feed hidden states back through their own path)")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, LatentCache):
            raise ValueError("cache must be the LatentCache returned by this model (or None)")
        b, T = input_ids.shape
        cache = cache if cache is not None else LatentCache(self.config.num_hidden_layers)
        past = cache.num_tokens
        if attention_mask is None:
            attention_mask = torch.ones(b, past + T, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape[1] != past + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens, expected "
                             f"{past + T} (cached {past} + new {T})")
        mask = attention_mask.bool()
        if position_ids is None:
            position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
        logits, num_steps = self._latent_forward(input_ids, mask[:, past:], position_ids, cache)
        cache.num_tokens = past + T
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return LlamaAlcotOutput(loss=loss, logits=logits, num_steps=num_steps,
                                **{_CACHE_FIELD: cache if use_cache is not False else None})

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, max_new_tokens=None, max_length=None,
                 do_sample=None, temperature=None, top_k=None, top_p=None, eos_token_id=None,
                 pad_token_id=None, stopping_criteria=None, generation_config=None,
                 return_dict_in_generate=None, num_beams=1, **kwargs):
        """Greedy or sampled decoding through the KV cache (one token, all its latent steps, at a time).

        Returns ``sequences`` (LongTensor), or with ``return_dict_in_generate=True`` an output with
        ``sequences`` and ``latent_steps`` ``[b, new]``. ``self.last_latent_steps`` holds the latter.
        """
        gc = generation_config if generation_config is not None else self.generation_config

        def pick(value, name, default):
            if value is not None:
                return value
            got = getattr(gc, name, None) if gc is not None else None
            return default if got is None else got

        for name in ("num_return_sequences", "num_beams"):
            if (kwargs.get(name) or 1) > 1 or (name == "num_beams" and (num_beams or 1) > 1):
                raise ValueError(f"{name} > 1 is not supported by llama_alcot generate")
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        do_sample = bool(pick(do_sample, "do_sample", False))
        temperature = float(pick(temperature, "temperature", 1.0))
        top_k = int(pick(top_k, "top_k", 0) or 0)
        top_p = float(pick(top_p, "top_p", 1.0))
        eos = pick(eos_token_id, "eos_token_id", None)
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = pick(pad_token_id, "pad_token_id", None)
        pad = pad if pad is not None else (eos[0] if eos else 0)
        b, T = input_ids.shape
        if max_new_tokens is None:
            max_len = max_length if max_length is not None else getattr(gc, "max_length", None)
            max_new_tokens = (max_len - T) if max_len is not None else 20
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache = LatentCache(self.config.num_hidden_layers)
        seqs, steps_out = input_ids, []
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        out = self(input_ids, attention_mask=attention_mask, cache=cache)
        for i in range(max(int(max_new_tokens), 0)):
            logits = out.logits[:, -1].float()
            if do_sample:
                nxt = _sample(logits, temperature, top_k, top_p)
            else:
                nxt = logits.argmax(-1)
            # the latent steps a token used are those of the position that predicted it
            steps_out.append(torch.where(done, -1, out.num_steps[:, -1]))
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            seqs = torch.cat([seqs, nxt[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, (~done).long()[:, None]], dim=1)
            if eos:
                done = done | torch.isin(nxt, torch.tensor(eos, device=nxt.device))
            if stopping_criteria is not None:
                stop = stopping_criteria(seqs, None)
                done = done | (stop.to(done.device) if isinstance(stop, torch.Tensor) else bool(stop))
            if bool(done.all()) or i == int(max_new_tokens) - 1:
                break
            out = self(nxt[:, None], attention_mask=attention_mask, cache=cache)
        latent = torch.stack(steps_out, 1) if steps_out else seqs.new_zeros(b, 0)
        self.last_latent_steps = latent
        if pick(return_dict_in_generate, "return_dict_in_generate", False):
            return LlamaAlcotGenerateOutput(sequences=seqs, latent_steps=latent, cache=cache)
        return seqs


def _sample(logits, temperature, top_k, top_p):
    """One token per row from ``logits [b, V]`` with temperature, top-k and nucleus filtering."""
    logits = logits / max(temperature, 1e-6)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = (probs.cumsum(-1) - probs) > top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1).squeeze(-1)


__all__ = ["LlamaAlcotForCausalLM", "LlamaAlcotModel", "LlamaAlcotPreTrainedModel", "LatentCache"]
