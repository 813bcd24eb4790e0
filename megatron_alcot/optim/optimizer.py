"""AdamW with Megatron's step logic: unscale, NaN/Inf check, global-norm clipping, update.

    >>> opt = build_optimizer(model, optim_cfg, train_cfg)
    >>> loss.backward()                                 # (times the loss scale under --fp16)
    >>> result = opt.step()                             # StepResult(updated, grad_norm, found_inf)

Precision: parameters, gradients and Adam state are fp32 in every mode. ``--bf16``/``--fp16``
run the model's matmuls under autocast (``training.train_step``), so the fp32 parameters are the
master weights and no second copy is kept. The optimizer is apex ``FusedAdam`` (AdamW mode) when
apex is importable and the parameters are on CUDA, else ``torch.optim.AdamW(fused=True)`` where
the device supports it, else the ``foreach`` implementation.

Weight decay applies to matrices only: norms, biases and other 1-D parameters get none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, List, Sequence

import torch

from megatron_alcot.optim.clip_grads import clip_grads_by_norm, get_grad_norm
from megatron_alcot.optim.grad_scaler import build_grad_scaler


@dataclass
class StepResult:
    updated: bool             # False when the step was skipped (overflow or NaN/Inf)
    grad_norm: float          # global norm before clipping (nan/inf when found_inf)
    found_inf: bool           # some gradient was NaN/Inf


def param_groups(named_params: Iterable, weight_decay: float) -> List[dict]:
    """Split into decay / no-decay groups (no decay for biases, norms and any 1-D tensor)."""
    decay, no_decay = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def _make_adamw(groups, optim_cfg) -> torch.optim.Optimizer:
    kwargs = dict(lr=optim_cfg.lr, betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2),
                  eps=optim_cfg.adam_eps, weight_decay=optim_cfg.weight_decay)
    device = groups[0]["params"][0].device if groups else torch.device("cpu")
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # type: ignore
            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        except Exception:  # apex absent or built without CUDA extensions
            pass
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


class MegatronOptimizer:
    """Wraps a torch optimizer; exposes ``param_groups``/``state`` for checkpointing."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, clip_grad: float, grad_scaler=None,
                 norm_groups: Sequence = ()):
        self.optimizer = optimizer
        self.clip_grad = clip_grad
        self.grad_scaler = grad_scaler
        self.norm_groups = tuple(norm_groups)

    # --- what checkpointing and the scheduler see -------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def parameters(self) -> List[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def loss_scale(self) -> float:
        return self.grad_scaler.scale if self.grad_scaler is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.grad_scaler.scale if self.grad_scaler is not None else loss

    # --- the step ------------------------------------------------------------------------------
    def step(self) -> StepResult:
        params = self.parameters()
        grads = [p.grad for p in params if p.grad is not None]
        if self.grad_scaler is not None and grads:
            torch._foreach_mul_(grads, self.grad_scaler.inv_scale)
        # The global norm doubles as the overflow check: any NaN/Inf gradient makes it non-finite,
        # and it is reduced over the model-parallel ranks, so every rank takes the same decision.
        norm = float(get_grad_norm(params, self.norm_groups))
        found_inf = not math.isfinite(norm)
        if self.grad_scaler is not None:
            self.grad_scaler.update(found_inf)
        if found_inf:
            return StepResult(False, norm, True)
        clip_grads_by_norm(params, self.clip_grad, torch.tensor(norm))
        self.optimizer.step()
        return StepResult(True, norm, False)


def build_optimizer(model: torch.nn.Module, optim_cfg, train_cfg=None,
                    norm_groups: Sequence = ()) -> MegatronOptimizer:
    """AdamW over ``model``'s parameters with the decay/no-decay split and the fp16 scaler."""
    groups = param_groups(model.named_parameters(), optim_cfg.weight_decay)
    inner = _make_adamw(groups, optim_cfg)
    scaler = build_grad_scaler(train_cfg) if train_cfg is not None else None
    return MegatronOptimizer(inner, clip_grad=optim_cfg.clip_grad, grad_scaler=scaler,
                             norm_groups=norm_groups)
