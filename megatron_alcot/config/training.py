"""The run: optimizer and schedule, batching and length, precision, checkpoints, logging.

    >>> OptimizerConfig(lr=3e-4, min_lr=3e-5, lr_warmup_fraction=0.02).validate(train_iters=50000)
    >>> TrainConfig(micro_batch_size=4, global_batch_size=256, train_iters=100).num_micro_batches(dp=8)
    8
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from megatron_alcot.config.fields import ConfigError, check_choice, flag, flag_of

LR_DECAY_STYLES = ("cosine", "linear", "constant")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
OPTIMIZERS = ("adam",)
EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")


@dataclass
class OptimizerConfig:
    """AdamW and its learning-rate schedule (Megatron semantics, docs/architecture.md §2).

        >>> OptimizerConfig(lr=3e-4, min_lr=3e-5, lr_warmup_fraction=0.02).validate(train_iters=50000)
    """

    optimizer: str = flag("--optimizer", default="adam", choices=OPTIMIZERS,
                          help="AdamW (Adam with decoupled weight decay), the only optimizer here")
    lr: float = flag("--lr", default=3e-4, help="peak learning rate, reached at the end of the warm-up")
    min_lr: float = flag("--min-lr", default=0.0, help="learning rate at the end of the decay, and after it")
    lr_decay_style: str = flag("--lr-decay-style", default="cosine", choices=LR_DECAY_STYLES,
                               help="shape of the decay from --lr to --min-lr")
    lr_decay_iters: Optional[int] = flag("--lr-decay-iters", default=None,
                                         help="iterations of warm-up plus decay (default: the whole run)")
    lr_warmup_iters: int = flag("--lr-warmup-iters", default=0,
                                help="iterations of linear warm-up from --lr-warmup-init to --lr")
    lr_warmup_fraction: Optional[float] = flag(
        "--lr-warmup-fraction", default=None,
        help="warm-up as a fraction of the decay iterations (exclusive with --lr-warmup-iters)")
    lr_warmup_init: float = flag("--lr-warmup-init", default=0.0, help="learning rate at iteration 0")
    weight_decay: float = flag("--weight-decay", default=0.01,
                               help="decoupled weight decay (never on norms, biases or other 1-D parameters)")
    adam_beta1: float = flag("--adam-beta1", default=0.9, help="Adam β1 (decay of the gradient mean)")
    adam_beta2: float = flag("--adam-beta2", default=0.999, help="Adam β2 (decay of the squared-gradient mean)")
    adam_eps: float = flag("--adam-eps", default=1e-8, help="Adam ε added to the denominator")
    clip_grad: float = flag("--clip-grad", default=1.0,
                            help="clip the global L2 gradient norm to this (0: no clipping)")

    def warmup_iters(self, decay_iters: int) -> int:
        if self.lr_warmup_fraction is not None:
            return int(self.lr_warmup_fraction * decay_iters)
        return self.lr_warmup_iters

    def validate(self, train_iters: Optional[int] = None) -> None:
        if self.optimizer != "adam":
            raise ConfigError(f"--optimizer {self.optimizer!r} is not supported; use adam (AdamW)")
        if self.lr < 0 or self.min_lr < 0:
            raise ConfigError("--lr and --min-lr must be >= 0")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        check_choice(self, "lr_decay_style")
        if self.lr_warmup_fraction is not None:
            if self.lr_warmup_iters:
                raise ConfigError("--lr-warmup-fraction and --lr-warmup-iters are exclusive; give one")
            if not 0.0 <= self.lr_warmup_fraction <= 1.0:
                raise ConfigError(f"--lr-warmup-fraction must lie in [0, 1], got {self.lr_warmup_fraction}")
        if self.lr_warmup_iters < 0:
            raise ConfigError(f"--lr-warmup-iters must be >= 0, got {self.lr_warmup_iters}")
        decay = self.lr_decay_iters if self.lr_decay_iters is not None else train_iters
        if self.lr_decay_iters is not None and self.lr_decay_iters <= 0:
            raise ConfigError(f"--lr-decay-iters must be positive, got {self.lr_decay_iters}")
        if decay is not None and self.warmup_iters(decay) > decay:
            raise ConfigError(f"warm-up ({self.warmup_iters(decay)} iterations, --lr-warmup-iters/"
                              f"--lr-warmup-fraction) is longer than the decay ({decay}, --lr-decay-iters)")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{flag_of(self, name)} must lie in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ConfigError(f"--adam-eps must be positive, got {self.adam_eps}")
        if self.clip_grad < 0:
            raise ConfigError(f"--clip-grad must be >= 0 (0 disables clipping), got {self.clip_grad}")


@dataclass
class TrainConfig:
    """Batching, length of the run, precision, recompute, checkpoints and exits.

    ``train_iters`` is the run length; ``--train-samples`` is converted to it in ``arguments.py``.

        >>> TrainConfig(micro_batch_size=4, global_batch_size=256, train_iters=100).validate(dp=8)
        >>> TrainConfig(micro_batch_size=4, global_batch_size=256).num_micro_batches(dp=8)
        8
    """

    micro_batch_size: int = flag("--micro-batch-size", default=1,
                                 help="samples per forward and backward on one rank")
    global_batch_size: Optional[int] = flag(
        "--global-batch-size", default=None,
        help="samples per iteration over all data-parallel ranks, a multiple of micro batch × DP; the rest is "
             "gradient accumulation (default: micro batch × DP)")
    train_iters: Optional[int] = flag("--train-iters", default=None,
                                      help="length of the run in iterations (or give --train-samples)")
    train_samples: Optional[int] = flag(
        "--train-samples", default=None,
        help="length of the run in samples, rounded up to whole iterations (exclusive with --train-iters)")
    seed: int = flag("--seed", default=1234, help="seed of the initialisation, dropout and data order")
    bf16: bool = flag("--bf16", default=False,
                      help="bf16 autocast compute; parameters, gradients and optimizer state stay fp32")
    fp16: bool = flag("--fp16", default=False,
                      help="fp16 autocast compute with loss scaling; parameters and gradients stay fp32")
    loss_scale: Optional[float] = flag("--loss-scale", default=None,
                                       help="static fp16 loss scale (default: dynamic, with --fp16)")
    initial_loss_scale: float = flag("--initial-loss-scale", default=2.0 ** 32,
                                     help="first dynamic loss scale of --fp16")
    min_loss_scale: float = flag("--min-loss-scale", default=1.0,
                                 help="the dynamic loss scale never drops below this")
    loss_scale_window: int = flag("--loss-scale-window", default=1000,
                                  help="iterations without overflow before the dynamic loss scale doubles")
    hysteresis: int = flag("--hysteresis", default=2,
                           help="overflowing iterations tolerated before the dynamic loss scale halves")
    recompute_granularity: Optional[str] = flag(
        "--recompute-granularity", default=None, choices=RECOMPUTE_GRANULARITIES,
        help="activation recompute in the backward: full recomputes whole layers, selective only each "
             "layer's attention (default: none)")
    recompute_method: Optional[str] = flag(
        "--recompute-method", default=None, choices=RECOMPUTE_METHODS,
        help="with --recompute-granularity full: uniform recomputes every layer, block only the first "
             "--recompute-num-layers layers")
    recompute_num_layers: Optional[int] = flag("--recompute-num-layers", default=None,
                                               help="layers that --recompute-method block recomputes")
    overlap_grad_reduce: bool = flag(
        "--overlap-grad-reduce", off="--no-overlap-grad-reduce", default=True,
        help="data-parallel gradient all-reduce of each bucket overlaps the rest of the backward")
    ddp_bucket_size_mb: float = flag("--ddp-bucket-size-mb", default=25.0,
                                     help="size of one fp32 gradient bucket in MB")
    overlap_param_gather: bool = flag(
        "--overlap-param-gather", default=False,
        help="with --use-distributed-optimizer: the parameter all-gather overlaps the next forward")
    grad_reduce_in_bf16: bool = flag("--grad-reduce-in-bf16", default=False,
                                     help="gradient buckets are reduced in bf16 (half the traffic)")
    eval_interval: int = flag("--eval-interval", default=1000, help="iterations between validation runs")
    eval_iters: int = flag("--eval-iters", default=100,
                           help="iterations of each validation run (0: no validation)")
    save: Optional[str] = flag("--save", default=None, metavar="DIR", help="checkpoint directory to write")
    load: Optional[str] = flag("--load", default=None, metavar="DIR",
                               help="checkpoint directory to resume from (its latest complete checkpoint)")
    save_interval: Optional[int] = flag("--save-interval", default=None,
                                        help="iterations between checkpoints (needs --save)")
    no_load_optim: bool = flag("--no-load-optim", default=False,
                               help="resume without the optimizer state (fresh Adam moments)")
    no_load_rng: bool = flag("--no-load-rng", default=False, help="resume without the saved random states")
    finetune: bool = flag("--finetune", default=False,
                          help="load the weights only: iteration, samples, optimizer and RNG start afresh")
    exit_signal_handler: bool = flag(
        "--exit-signal-handler", default=False,
        help="on --exit-signal finish the iteration, save a checkpoint and exit 0 (needs --save)")
    exit_signal: str = flag("--exit-signal", default="SIGTERM", choices=EXIT_SIGNALS,
                            help="the signal --exit-signal-handler waits for")
    keep_last_checkpoints: Optional[int] = flag(
        "--keep-last-checkpoints", default=None,
        help="delete all but this many newest complete checkpoints (default: keep all; needs --save)")
    exit_duration_in_mins: Optional[float] = flag(
        "--exit-duration-in-mins", default=None,
        help="save and exit 0 once the run has lasted this long (needs --save)")
    exit_interval: Optional[int] = flag("--exit-interval", default=None,
                                        help="stop when the iteration is a multiple of this")
    max_nan_skips: int = flag("--max-nan-skips", default=10,
                              help="consecutive iterations with a NaN/Inf loss or gradient skipped before the "
                                   "run stops (exit 3)")
    peak_flops: Optional[float] = flag("--peak-flops", default=None,
                                       help="peak TFLOP/s of one device, to report MFU")
    deterministic: bool = flag("--deterministic", default=False,
                               help="torch.use_deterministic_algorithms: bitwise repeatable runs, slower")
    torch_compile: bool = flag("--torch-compile", default=False,
                               help="compile each transformer layer with torch.compile")

    def resolved_global_batch(self, dp: int) -> int:
        return self.global_batch_size if self.global_batch_size is not None else self.micro_batch_size * dp

    def num_micro_batches(self, dp: int) -> int:
        return self.resolved_global_batch(dp) // (self.micro_batch_size * dp)

    def resolved_train_iters(self, dp: int) -> int:
        if self.train_iters is not None:
            return self.train_iters
        gbs = self.resolved_global_batch(dp)
        return (self.train_samples + gbs - 1) // gbs

    def validate(self, dp: int = 1) -> None:
        if self.micro_batch_size <= 0:
            raise ConfigError(f"--micro-batch-size must be positive, got {self.micro_batch_size}")
        gbs = self.resolved_global_batch(dp)
        if gbs <= 0 or gbs % (self.micro_batch_size * dp):
            raise ConfigError(
                f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
                f"{self.micro_batch_size} × data-parallel size {dp}; use a multiple of "
                f"{self.micro_batch_size * dp}")
        if (self.train_iters is None) == (self.train_samples is None):
            raise ConfigError("give exactly one of --train-iters and --train-samples")
        if self.train_iters is not None and self.train_iters < 0:
            raise ConfigError(f"--train-iters must be >= 0, got {self.train_iters}")
        if self.train_samples is not None and self.train_samples < 0:
            raise ConfigError(f"--train-samples must be >= 0, got {self.train_samples}")
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 and --fp16 are exclusive; pick one")
        if self.loss_scale is not None and self.loss_scale <= 0:
            raise ConfigError(f"--loss-scale must be positive, got {self.loss_scale}")
        if self.initial_loss_scale <= 0 or self.min_loss_scale <= 0:
            raise ConfigError("--initial-loss-scale and --min-loss-scale must be positive")
        if self.loss_scale_window <= 0 or self.hysteresis <= 0:
            raise ConfigError("--loss-scale-window and --hysteresis must be positive")
        if self.recompute_granularity not in (None,) + RECOMPUTE_GRANULARITIES:
            raise ConfigError(f"--recompute-granularity {self.recompute_granularity!r} is unknown; "
                              f"choose one of {', '.join(RECOMPUTE_GRANULARITIES)}")
        if self.recompute_method not in (None,) + RECOMPUTE_METHODS:
            raise ConfigError(f"--recompute-method {self.recompute_method!r} is unknown; "
                              f"choose one of {', '.join(RECOMPUTE_METHODS)}")
        if self.recompute_method is not None and self.recompute_granularity != "full":
            raise ConfigError("--recompute-method needs --recompute-granularity full")
        if self.recompute_num_layers is not None:
            if self.recompute_method is None:
                raise ConfigError("--recompute-num-layers needs --recompute-method uniform or block")
            if self.recompute_num_layers <= 0:
                raise ConfigError(f"--recompute-num-layers must be positive, got {self.recompute_num_layers}")
        if self.ddp_bucket_size_mb <= 0:
            raise ConfigError(f"--ddp-bucket-size-mb must be positive, got {self.ddp_bucket_size_mb}")
        for name in ("eval_interval", "save_interval", "exit_interval"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{flag_of(self, name)} must be positive, got {value}")
        if self.eval_iters < 0:
            raise ConfigError(f"--eval-iters must be >= 0, got {self.eval_iters}")
        if self.save_interval is not None and self.save is None:
            raise ConfigError("--save-interval needs --save DIR")
        if (self.exit_signal_handler or self.exit_duration_in_mins) and self.save is None:
            raise ConfigError("--exit-signal-handler and --exit-duration-in-mins save before exiting; "
                              "give --save DIR")
        if self.exit_duration_in_mins is not None and self.exit_duration_in_mins <= 0:
            raise ConfigError(f"--exit-duration-in-mins must be positive, got {self.exit_duration_in_mins}")
        if self.keep_last_checkpoints is not None:
            if self.keep_last_checkpoints < 1:
                raise ConfigError(f"--keep-last-checkpoints must be >= 1, got {self.keep_last_checkpoints}")
            if self.save is None:
                raise ConfigError("--keep-last-checkpoints needs --save DIR")
        if self.max_nan_skips < 1:
            raise ConfigError(f"--max-nan-skips must be >= 1, got {self.max_nan_skips}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"--peak-flops (TFLOP/s per device) must be positive, got {self.peak_flops}")


@dataclass
class LoggingConfig:
    """What the loop reports and where (console on rank 0, TensorBoard, a JSON-lines metrics file)."""

    log_interval: int = flag("--log-interval", default=100, help="iterations between console log lines")
    tensorboard_dir: Optional[str] = flag("--tensorboard-dir", default=None, metavar="DIR",
                                          help="also write TensorBoard scalars here")
    metrics_file: Optional[str] = flag(
        "--metrics-file", default=None, metavar="PATH",
        help="also append a JSON line per logged iteration and per evaluation to this file")
    log_timers: bool = flag("--timing-log", default=False, help="per-phase timers on every console line")
    quiet: bool = flag("--quiet", default=False, help="no console lines (the history is still recorded)")

    def validate(self) -> None:
        if self.log_interval <= 0:
            raise ConfigError(f"--log-interval must be positive, got {self.log_interval}")
        if self.metrics_file is not None and os.path.isdir(self.metrics_file):
            raise ConfigError(f"--metrics-file {self.metrics_file} is a directory; give a file path "
                              "(e.g. logs/metrics.jsonl)")
