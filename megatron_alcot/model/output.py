"""What a forward pass and a lap return.

    out = model(tokens, labels=labels, loss_mask=loss_mask)
    out.loss.backward(); out.num_steps   # [b, s] executed latent steps per token
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch


@dataclass
class LapState:
    """What passes from lap to lap (and stage to stage): static shapes, docs/architecture.md §5.

    ``hidden`` is the input of this lap's first layer on the first stage (lap-0 embedding or the
    fed-back ``h_{·,k-1}``), and the previous stage's output on later stages.
    """

    hidden: torch.Tensor                 # [b, s, h]
    active: torch.Tensor                 # [b, s] bool: token executes this lap
    reach: torch.Tensor                  # [b, s] fp32: r_{t,k}
    k: int                               # the lap index k
    position_ids: Optional[torch.Tensor] = None   # [b, s] int64; None: 0..s-1 for every row
    sizes: Optional[Tuple[int, int]] = None       # host (active count, largest per batch row) when
                                                  # known without a sync; None: Compaction reads them


@dataclass
class ModelOutput:
    loss: Optional[torch.Tensor] = None          # lm_loss + latent_loss
    lm_loss: Optional[torch.Tensor] = None       # masked-mean CE of the readout
    latent_loss: Optional[torch.Tensor] = None   # λ·masked-mean Σ r·sg(p)^β (0 without a router)
    logits: Optional[torch.Tensor] = None        # [b, s, V_padded/tp] vocab-parallel readout logits
    per_token_loss: Optional[torch.Tensor] = None  # [b, s] fp32 CE of the readout (unmasked; detached when fused)
    num_steps: Optional[torch.Tensor] = None     # [b, s] int64 ℓ_t
    exit_mass: Optional[torch.Tensor] = None     # [b, s, ℓmax+1] fp32, rows sum to 1
    lap_active: Optional[torch.Tensor] = None   # [ℓmax+1] int64 tokens that executed step k
    continue_prob: Optional[torch.Tensor] = None  # [b, s, ℓmax] fp32 router g_{t,k} (0 where not run)
    lap_hidden: Optional[List[torch.Tensor]] = None  # h_{·,k} [b, s, h] per lap (return_lap_hidden)
    lap_executed: Optional[torch.Tensor] = None  # [ℓmax+1, b, s] bool
    kv: Optional[list] = None                    # per lap LapKV of this stage (return_kv)
    extras: dict = field(default_factory=dict)   # method-specific values


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the tokens where ``mask`` > 0 (0 when none)."""
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
