"""ℓmax of an export is read from its config keys, the same for exports written before and after
the remote config class named its property ``max_latent_steps``."""
from types import SimpleNamespace

import pytest

from megatron_alcot.hf import export_max_latent_steps
from megatron_alcot.hf.configuration_llama_alcot import LlamaAlcotConfig


def test_from_keys_without_the_property():
    assert export_max_latent_steps(SimpleNamespace(latent_method="alcot", latent_max_steps=3)) == 3
    assert export_max_latent_steps(SimpleNamespace(latent_method="loop", latent_max_steps=2)) == 2
    assert export_max_latent_steps(SimpleNamespace(latent_method="vanilla", latent_max_steps=3)) == 0
    assert export_max_latent_steps(SimpleNamespace(vocab_size=32)) == 0       # plain LLaMA export


@pytest.mark.parametrize("method", ["vanilla", "alcot", "loop", "pause", "ponder"])
def test_agrees_with_the_shipped_config(method):
    cfg = LlamaAlcotConfig(latent_method=method, latent_max_steps=2, vocab_size=32, hidden_size=8,
                           num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    assert export_max_latent_steps(cfg) == cfg.max_latent_steps
