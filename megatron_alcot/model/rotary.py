"""Rotary position embedding, rotate-half convention (HF ``LlamaRotaryEmbedding``).

    rope = RotaryEmbedding(head_dim=64, base=10000.0)
    cos, sin = rope(positions)            # positions: int64 [n] -> fp32 [n, head_dim] each
    q = apply_rotary(q, cos, sin)         # q: [n, heads, head_dim]; cos/sin broadcast over heads

cos/sin are computed in fp32 exactly as HF does (inverse frequencies ``base ** -(2i/d)``, angles
``pos · inv_freq``, duplicated halves), so exporting the weights is a pure relabelling. Every
latent step of token t uses the same position t.
"""
from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary (per-row) position ids; no learned parameters."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.base = float(base)
        inv_freq = 1.0 / (self.base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor):
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [..., rows, heads, d]`` rotated by per-row ``cos/sin [..., rows, d]`` (cast to x's dtype)."""
    cos = cos.to(x.dtype).unsqueeze(-2)
    sin = sin.to(x.dtype).unsqueeze(-2)
    return x * cos + rotate_half(x) * sin
