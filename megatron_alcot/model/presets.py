"""Named model shapes: tiny test configs, the paper's LLaMA 410M / 1.4B, LLaMA-2 7B.

    cfg = preset("410m", latent_method="alcot", latent_max_steps=3)
    cfg = preset("tiny")                      # unit tests: 2 layers, hidden 64, vocab 256
"""
from __future__ import annotations

from dataclasses import replace

from megatron_alcot.config import ModelConfig

PRESETS = {
    # Unit-test sizes (CPU, seconds), untied.
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=128, vocab_size=256, make_vocab_size_divisible_by=32, seq_length=32,
                 untie_embeddings_and_output_weights=True),
    "tiny-tp4": dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                     ffn_hidden_size=128, vocab_size=256, make_vocab_size_divisible_by=32,
                     seq_length=32, untie_embeddings_and_output_weights=True),
    "small": dict(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=688,
                  vocab_size=1024, seq_length=256, untie_embeddings_and_output_weights=True),
    # The paper's models (PonderLM-2 repo configs; GPT-NeoX vocab padded to 50304), untied.
    "410m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=2752,
                 vocab_size=50304, seq_length=2048, untie_embeddings_and_output_weights=True),
    "1.4b": dict(num_layers=24, hidden_size=2048, num_attention_heads=32, ffn_hidden_size=5504,
                 vocab_size=50304, seq_length=2048, untie_embeddings_and_output_weights=True),
    # LLaMA-2 7B.
    "7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
               vocab_size=32000, seq_length=4096, untie_embeddings_and_output_weights=True),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A ModelConfig for a named shape, with any field overridden."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(ModelConfig(**PRESETS[name]), **overrides)
