"""A deliberately naive ALCoT forward for the model tests: every token at every step is computed
on full weights, and attention loops over each executed (t, k) query with an explicit list of the
keys it may see. Slow by design; shares no code with the model except the config."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, hd, base):
    # x [b, s, heads, hd]; rotate-half convention
    inv = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = pos[..., None].float() * inv  # [b, s, hd/2]
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def routers_random(model, std=0.15, seed=0):
    """Give the routers random weights so that learned halting makes a mixture of ℓ_t."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in getattr(model.latent, "routers", []):
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * std)
            r.bias.fill_(0.5)


def naive_forward(model, tokens, labels=None, loss_mask=None, halting="learned"):
    cfg = model.config
    W = dict(model.named_parameters())
    b, s = tokens.shape
    L = cfg.max_latent_steps
    hd, nh, ng = cfg.head_dim, cfg.num_attention_heads, cfg.query_groups
    hpg = nh // ng
    eps = cfg.norm_epsilon
    pos = torch.arange(s).expand(b, s)
    x = W["embedding.word_embeddings.weight"][tokens] * cfg.embed_scale
    out_w = W["output_layer.weight"] if "output_layer.weight" in W else W["embedding.word_embeddings.weight"]
    active = torch.ones(b, s, dtype=torch.bool)
    reach = torch.ones(b, s)
    keys, vals, executed = {}, {}, []
    hs, exits, pen = [], [], torch.zeros(b, s)
    mask = torch.ones(b, s) if loss_mask is None else loss_mask.float()
    for k in range(L + 1):
        executed.append(active)
        h = x
        for layer in range(cfg.num_layers):
            p = f"decoder.layers.{layer}."
            xn = _rms(h, W[p + "input_layernorm.weight"], eps)
            qkv = (xn @ W[p + "self_attention.linear_qkv.weight"].t()).view(b, s, ng, hpg + 2, hd)
            q = _rope(qkv[:, :, :, :hpg].reshape(b, s, nh, hd), pos, hd, cfg.rotary_base)
            keys[layer, k] = _rope(qkv[:, :, :, hpg], pos, hd, cfg.rotary_base)
            vals[layer, k] = qkv[:, :, :, hpg + 1]
            rows = []
            for bi in range(b):
                for t in range(s):
                    if not active[bi, t]:
                        rows.append(torch.zeros(nh, hd))
                        continue
                    visible = [(tp, j) for j in range(k + 1) for tp in range(t + 1) if executed[j][bi, tp]]
                    K = torch.stack([keys[layer, j][bi, tp] for tp, j in visible]).repeat_interleave(hpg, 1)
                    V = torch.stack([vals[layer, j][bi, tp] for tp, j in visible]).repeat_interleave(hpg, 1)
                    att = torch.softmax(torch.einsum("hd,nhd->hn", q[bi, t], K) / math.sqrt(hd), -1)
                    rows.append(torch.einsum("hn,nhd->hd", att, V))
            a = torch.stack(rows).view(b, s, nh * hd)
            h = h + a @ W[p + "self_attention.linear_proj.weight"].t()
            xn = _rms(h, W[p + "pre_mlp_layernorm.weight"], eps)
            gate, up = (xn @ W[p + "mlp.linear_fc1.weight"].t()).chunk(2, -1)
            h = h + (F.silu(gate) * up) @ W[p + "mlp.linear_fc2.weight"].t()
        hk = _rms(h, W["decoder.final_layernorm.weight"], eps)
        hs.append(hk)
        if k < L:
            g = torch.sigmoid(hk @ W[f"latent.routers.{k}.weight"].t() + W[f"latent.routers.{k}.bias"]).squeeze(-1)
            r_next = reach * g
            if callable(halting):
                go = halting(k, r_next, active)
            else:
                go = {"learned": r_next >= cfg.latent_threshold, "never": torch.ones_like(active),
                      "always": torch.zeros_like(active)}[halting]
            cont = active & go
            exits.append(torch.where(cont, reach * (1 - g), torch.where(active, reach, torch.zeros_like(reach))))
            if labels is not None:
                with torch.no_grad():
                    pk = torch.softmax(hk @ out_w.t(), -1).gather(-1, labels[..., None]).squeeze(-1)
                on = (active if cfg.latent_loss_scope == "decided" else cont) & (mask > 0)
                pen = pen + torch.where(on, r_next * pk ** cfg.latent_loss_beta, torch.zeros_like(pk))
            reach, active, x = r_next, cont, hk
        else:
            exits.append(torch.where(active, reach, torch.zeros_like(reach)))
    result = {"hidden": hs, "exit": torch.stack(exits, -1), "executed": torch.stack(executed),
              "num_steps": torch.stack(executed)[1:].sum(0)}
    if cfg.latent_readout == "hidden":
        hbar = sum(e[..., None] * hk for e, hk in zip(exits, hs))
        logits = hbar @ out_w.t()
        result["logits"] = logits
        if labels is not None:
            ce = F.cross_entropy(logits.reshape(b * s, -1), labels.reshape(-1), reduction="none").view(b, s)
    else:
        probs = sum(e[..., None] * torch.softmax(hk @ out_w.t(), -1) for e, hk in zip(exits, hs))
        result["logits"] = probs.log()
        if labels is not None:
            ce = -probs.gather(-1, labels[..., None]).squeeze(-1).log()
    if labels is not None:
        result["lm_loss"] = (ce * mask).sum() / mask.sum()
        result["latent_loss"] = cfg.latent_loss_weight * (pen * mask).sum() / mask.sum()
        result["loss"] = result["lm_loss"] + result["latent_loss"]
    return result
