"""Hugging Face config of a megatron_alcot export (``model_type: llama_alcot``).

Shipped into export directories next to ``modeling_llama_alcot.py`` and loaded through ``auto_map``:

    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained("hf_out", trust_remote_code=True)
    cfg.latent_method, cfg.latent_max_steps, cfg.latent_threshold, cfg.embed_scale

Self-contained: imports only transformers. All LLaMA fields are inherited from ``LlamaConfig``.
"""
from typing import Optional

from transformers import LlamaConfig

LATENT_METHODS = ("vanilla", "alcot", "loop", "pause", "ponder")


class LlamaAlcotConfig(LlamaConfig):
    """LLaMA plus the latent-step method (token-level adaptive latent chain of thought).

    ``latent_method``: vanilla | alcot | loop | pause | ponder; ``latent_max_steps``: ℓmax (K for the
    baselines); ``latent_threshold``: τ on the reach; ``latent_readout``: hidden (exit-mass mixture of
    hidden states) | prob (mixture of per-step distributions); ``embed_scale``: the factor s applied
    to token embeddings (sqrt(2.5·h) by default for latent methods).
    """

    model_type = "llama_alcot"

    latent_method: str = "alcot"
    latent_max_steps: int = 3
    latent_threshold: float = 0.1
    latent_router_init_prob: float = 0.9
    latent_loss_weight: float = 0.03
    latent_loss_beta: float = 1.0
    latent_loss_scope: str = "continued"
    latent_readout: str = "hidden"
    latent_embed_scale: Optional[float] = None
    embed_scale: float = 1.0
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.latent_method not in LATENT_METHODS:
            raise ValueError(f"latent_method {self.latent_method!r} is unknown; choose one of "
                             f"{', '.join(LATENT_METHODS)}")
        if self.latent_readout not in ("hidden", "prob"):
            raise ValueError(f"latent_readout {self.latent_readout!r} must be 'hidden' or 'prob'")

    @property
    def max_latent_steps(self) -> int:
        return 0 if self.latent_method == "vanilla" else int(self.latent_max_steps)


__all__ = ["LlamaAlcotConfig"]
