"""Routers and the halting rule of ALCoT (docs/method.md §4).

    routers = Routers(hidden_size, max_latent_steps=3, init_prob=0.9)   # latent.routers.{k}: fp32 h -> 1
    g = routers.continue_prob(k, h)                  # [b, s] fp32, sigmoid(w_k·h + b_k)
    r_next, cont, e = halting_update(reach, g, active, tau, k, halting)

Reach ``r_{t,0} = 1``, ``r_{t,k+1} = r_{t,k}·g_{t,k}``; step k+1 runs iff ``r_{t,k+1} >= τ`` (and the
token ran step k); the exit mass of step k is ``r·(1-g)`` if the token goes on, else all of the
remaining reach ``r``, so the masses of executed steps sum to 1.

Precision: everything here is fp32 whatever the caller's precision. Under autocast (``--bf16``,
``--fp16``) the router's GEMV would run in bf16 (g at init 0.90234375 instead of 0.9; ``1 - g``
loses most of its bits past g = 0.98), so :func:`router_logit` turns autocast off and upcasts ``h``
and the weights; a router stored in bf16 (DeepSpeed's bf16 mode casts every parameter) is still
evaluated in fp32, from its rounded weights. Reach and exit masses are fp32 products of fp32 inputs.

``halting`` forces halting in tests: ``"learned"`` (the rule above), ``"never"`` (every step runs),
``"always"`` (no latent step runs) or a callable ``fn(k, r_next, active) -> bool [b, s]``.
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

Halting = Union[str, Callable]
HALTING_MODES = ("learned", "never", "always")


class Routers(nn.ModuleList):
    """One fp32 ``Linear(h, 1)`` per latent decision k < ℓmax (weight 0, bias logit(g_init));
    held as ``latent.routers`` so the parameters are ``latent.routers.{k}.weight/bias``."""

    def __init__(self, hidden_size: int, max_latent_steps: int, init_prob: float = 0.9):
        super().__init__(nn.Linear(hidden_size, 1, dtype=torch.float32) for _ in range(max_latent_steps))
        with torch.no_grad():
            for r in self:
                r.weight.zero_()
                r.bias.fill_(math.log(init_prob / (1.0 - init_prob)))

    def continue_prob(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """``g_{·,k}`` fp32 ``[...]`` from ``h [..., hidden]`` (computed in fp32, autocast off)."""
        with torch.autocast(h.device.type, enabled=False):
            return torch.sigmoid(router_logit(self[k], h))


def router_logit(linear: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """``w·h + b`` fp32 ``[...]`` of a ``Linear(h, 1)``, with autocast off and every input upcast."""
    with torch.autocast(h.device.type, enabled=False):
        bias = linear.bias.float() if linear.bias is not None else None
        return F.linear(h.float(), linear.weight.float(), bias).squeeze(-1)


def check_halting(halting: Halting) -> None:
    if not callable(halting) and halting not in HALTING_MODES:
        raise ValueError(f"halting={halting!r}: use one of {', '.join(HALTING_MODES)} or a callable "
                         "fn(k, reach_next, active) -> bool mask")


def halting_update(reach: torch.Tensor, g: torch.Tensor, active: torch.Tensor, tau: float,
                   k: int, halting: Halting = "learned"):
    """(r_next, cont, exit_mass) after lap ``k`` for tokens that ran it (``active``)."""
    reach, g = reach.float(), g.float()
    r_next = reach * g
    if callable(halting):
        go = halting(k, r_next, active).to(torch.bool)
    elif halting == "learned":
        go = r_next >= tau
    elif halting == "never":
        go = torch.ones_like(active)
    else:
        go = torch.zeros_like(active)
    cont = active & go
    exit_mass = torch.where(active, torch.where(cont, reach * (1.0 - g), reach), 0.0)
    return r_next, cont, exit_mass
