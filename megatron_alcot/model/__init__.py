"""The LLaMA model with latent steps (docs/method.md, docs/architecture.md §5).

    from megatron_alcot.model import build_model
    model = build_model(model_cfg, parallel_cfg)               # PP = 1: one stage holds everything
    out = model(tokens, labels=labels, loss_mask=loss_mask)    # out.loss, out.num_steps, ...
    stage = build_model(cfg, pcfg, pre_process=False, post_process=True, layer_range=(12, 24))

Files: ``llama.py`` (``LlamaModel``: a stage and its ``run_lap``), ``transformer_layer.py`` (norm,
MLP, layer, init), ``spec.py`` (the kernels, chosen once per model), ``attention.py`` (2-D-masked
GQA with K/V reuse), ``compaction.py`` (active-row
gather/scatter and padded layout), ``latent/`` (the loop over laps, ALCoT and the baselines),
``rotary.py``, ``output.py``, ``presets.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

from megatron_alcot.config import ConfigError, ModelConfig
from megatron_alcot.model.attention import LapKV
from megatron_alcot.model.output import LapState, ModelOutput
from megatron_alcot.model.llama import LlamaModel


def build_model(model_cfg: ModelConfig, parallel_cfg=None, pre_process: bool = True,
                post_process: bool = True, layer_range: Optional[Tuple[int, int]] = None,
                seed: int = 1234) -> LlamaModel:
    """Validate the config and build one stage (all layers by default).

    ``layer_range=(start, end)`` selects global layers ``start..end-1``; ``seed`` fixes the
    initial weights independently of TP/PP layout and of the global RNG state.
    """
    model_cfg.validate(parallel_cfg)
    if layer_range is not None:
        start, end = layer_range
        if not 0 <= start < end <= model_cfg.num_layers:
            raise ConfigError(f"layer_range {tuple(layer_range)} must satisfy 0 <= start < end <= "
                              f"--num-layers {model_cfg.num_layers}")
    return LlamaModel(model_cfg, parallel_cfg, pre_process, post_process, layer_range, seed)


__all__ = ["build_model", "LlamaModel", "LapState", "ModelOutput", "LapKV"]
