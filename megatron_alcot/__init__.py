"""megatron_alcot: Megatron-style LLaMA pretraining with token-level adaptive latent chain-of-thought."""
__version__ = "0.1.0"
