"""One run's typed configs together, and the checks that span them.

    from megatron_alcot.config.run import RunConfig, validate_run
    config = RunConfig(model=ModelConfig(num_layers=2, ...), train=TrainConfig(train_iters=10, ...),
                       data=DataConfig(mock_data=True, tokenizer_type="NullTokenizer", vocab_size=1000))
    validate_run(config, world_size=1)     # ConfigError naming the flag, before any compute
    config.to_dict()                       # what checkpoints store as the run's configuration

``arguments.parse_args(argv)`` builds one from the command line; ``training.train.train(config)``
runs it. Neither the configs nor the training depend on the command-line layer. (Not exported by
``megatron_alcot.config``: the data checks import ``data.utils``, which imports the configs.)
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from megatron_alcot.config.data import NEEDS_TOKENIZER_MODEL, TOKENIZER_TYPES, DataConfig
from megatron_alcot.config.fields import ConfigError
from megatron_alcot.config.model import ModelConfig
from megatron_alcot.config.parallel import ParallelConfig
from megatron_alcot.config.training import LoggingConfig, OptimizerConfig, TrainConfig
from megatron_alcot.data.utils import parse_blend, parse_split


@dataclass
class RunConfig:
    """Every config of a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (what checkpoints store as the run's configuration)."""
        return {name: asdict(getattr(self, name))
                for name in ("model", "parallel", "data", "train", "optim", "logging")}


def validate_run(config: RunConfig, world_size: int) -> None:
    """Check the whole configuration before any compute; raise ConfigError naming the flag."""
    par = config.parallel
    par.validate(world_size)
    config.model.validate(par)
    par.validate_layer_split(config.model.num_layers)
    dp = par.data_parallel_size(world_size)
    config.train.validate(dp)
    config.optim.validate(config.train.resolved_train_iters(dp))
    config.logging.validate()
    _validate_data(config.data, config.model, config.train)
    if config.train.recompute_granularity == "selective" and config.model.num_layers < 1:
        raise ConfigError("--recompute-granularity selective needs at least one layer")
    if config.train.recompute_num_layers and config.train.recompute_num_layers > config.model.num_layers:
        raise ConfigError(f"--recompute-num-layers {config.train.recompute_num_layers} is larger than "
                          f"--num-layers {config.model.num_layers}")
    _validate_deepspeed(config)


def _validate_deepspeed(config: RunConfig) -> None:
    """``--deepspeed-config``: DeepSpeed is the data-parallel engine; refuse what it cannot join."""
    path, par, t = config.parallel.deepspeed_config, config.parallel, config.train
    if path is None:
        return
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed-config {path}: no such file (a DeepSpeed JSON config)")
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    clashes = [flag for flag, bad in (
        (f"--tensor-model-parallel-size {tp}", tp > 1),
        (f"--pipeline-model-parallel-size {pp}", pp > 1),
        ("--use-distributed-optimizer", par.use_distributed_optimizer),
        ("--fp16", t.fp16)) if bad]
    if clashes:
        raise ConfigError(f"--deepspeed-config does not combine with {', '.join(clashes)}: the DeepSpeed "
                          "engine runs data parallelism only (TP = PP = 1, ZeRO from its config, bf16 "
                          "via --bf16); use --use-distributed-optimizer for ZeRO with TP/PP or fp16")


def _validate_data(data: DataConfig, model: ModelConfig, train: TrainConfig) -> None:
    sources = [bool(data.data_path), bool(data.train_data_path), bool(data.mock_data)]
    if sum(sources) == 0:
        raise ConfigError("no training data: give --data-path PREFIX (or --train-data-path, "
                          "or --mock-data for synthetic tokens)")
    if data.data_path and data.train_data_path:
        raise ConfigError("--data-path and --train-data-path are exclusive (the per-split paths "
                          "replace --split)")
    for flag, paths in (("--data-path", data.data_path), ("--train-data-path", data.train_data_path),
                        ("--valid-data-path", data.valid_data_path),
                        ("--test-data-path", data.test_data_path)):
        blend = parse_blend(paths, flag)
        for prefix in blend[0] if blend else []:
            for ext in (".bin", ".idx"):
                if not os.path.exists(prefix + ext):
                    raise ConfigError(f"{flag}: {prefix + ext} does not exist (a prefix names the "
                                      "pair PREFIX.bin/PREFIX.idx written by tools/preprocess_data.py, "
                                      "e.g. data/corpus_text_document)")
    parse_split(data.split)
    if data.tokenizer_type not in TOKENIZER_TYPES:
        raise ConfigError(f"--tokenizer-type {data.tokenizer_type!r} is unknown; "
                          f"choose one of {', '.join(TOKENIZER_TYPES)}")
    if data.tokenizer_type in NEEDS_TOKENIZER_MODEL:
        if not data.tokenizer_model:
            raise ConfigError(f"--tokenizer-type {data.tokenizer_type} needs --tokenizer-model PATH")
        if not os.path.exists(data.tokenizer_model):
            raise ConfigError(f"--tokenizer-model {data.tokenizer_model} does not exist")
    if data.tokenizer_type == "NullTokenizer" and not data.vocab_size:
        raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size N")
    if data.vocab_size is not None and data.vocab_size <= 0:
        raise ConfigError(f"--vocab-size must be positive, got {data.vocab_size}")
    if data.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {data.num_workers}")
