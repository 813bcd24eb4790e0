"""Typed configuration for every part of megatron_alcot.

Each field carries its command-line flag, help text and choices (:func:`fields.flag`);
``arguments.py`` builds the parser from them. Configs are validated before any compute:
``cfg.validate()`` raises :class:`ConfigError` naming the flag and saying how to fix it.

    >>> cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1000)
    >>> cfg.validate(ParallelConfig(tensor_model_parallel_size=2))
    >>> cfg.padded_vocab_size(tp=2)
    1024

    model.py     ModelConfig: the LLaMA shape and the latent-step method
    parallel.py  ParallelConfig: TP × PP × DP, ZeRO, DeepSpeed, the process-group backend
    data.py      DataConfig: datasets, blends, splits, tokenizer
    training.py  OptimizerConfig, TrainConfig, LoggingConfig
    compat.py    CompatFlags: Megatron-LM flags that have no setting of their own here
    fields.py    flag() / internal(): the field metadata the parser is built from
    run.py       RunConfig: one run's configs together, validate_run (import it from config.run)
"""
from megatron_alcot.config.compat import TRANSFORMER_IMPLS, CompatFlags
from megatron_alcot.config.data import NEEDS_TOKENIZER_MODEL, TOKENIZER_TYPES, DataConfig
from megatron_alcot.config.fields import ConfigError, FlagSpec, flag, flag_specs, internal, is_internal
from megatron_alcot.config.model import (ATTENTION_BACKENDS, GEMM_BACKENDS, LATENT_LOSS_SCOPES, LATENT_METHODS,
                                         LATENT_READOUTS, ModelConfig)
from megatron_alcot.config.parallel import DISTRIBUTED_BACKENDS, PIPELINE_SCHEDULES, ParallelConfig
from megatron_alcot.config.training import (EXIT_SIGNALS, LR_DECAY_STYLES, OPTIMIZERS, RECOMPUTE_GRANULARITIES,
                                            RECOMPUTE_METHODS, LoggingConfig, OptimizerConfig, TrainConfig)

__all__ = ["ATTENTION_BACKENDS", "DISTRIBUTED_BACKENDS", "EXIT_SIGNALS", "GEMM_BACKENDS", "LATENT_LOSS_SCOPES",
           "LATENT_METHODS", "LATENT_READOUTS", "LR_DECAY_STYLES", "NEEDS_TOKENIZER_MODEL", "OPTIMIZERS",
           "PIPELINE_SCHEDULES", "RECOMPUTE_GRANULARITIES", "RECOMPUTE_METHODS", "TOKENIZER_TYPES",
           "TRANSFORMER_IMPLS", "CompatFlags", "ConfigError", "DataConfig", "FlagSpec", "LoggingConfig",
           "ModelConfig", "OptimizerConfig", "ParallelConfig", "TrainConfig", "flag", "flag_specs", "internal",
           "is_internal"]
