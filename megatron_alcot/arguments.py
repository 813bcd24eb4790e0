"""Megatron-LM command-line flags -> typed configs (:mod:`megatron_alcot.config`).

    >>> args = parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    ...                    "--micro-batch-size", "2", "--train-iters", "10", "--mock-data",
    ...                    "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"])
    >>> args.model.num_layers, args.train.micro_batch_size, args.optim.lr_decay_style
    (2, 2, 'cosine')
    >>> validate_args(args, world_size=1)          # raises ConfigError naming the flag

Flag names, meanings and defaults follow Megatron-LM wherever Megatron has the flag (one deliberate
difference: weight tying follows Megatron too, so embeddings are tied unless
``--untie-embeddings-and-output-weights`` is given). Flags Megatron scripts pass for features that
are always on here (RMSNorm, SwiGLU, RoPE, no biases, fused kernels) are accepted and checked for
consistency. Unknown flags stop with a close-match suggestion; every error exits with code 2
before any compute.
"""
from __future__ import annotations

import argparse
import difflib
import inspect
import os
import re
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Optional, Sequence

from megatron_alcot.config import (ATTENTION_BACKENDS, GEMM_BACKENDS, LATENT_LOSS_SCOPES, LATENT_METHODS,
                                   LATENT_READOUTS, LR_DECAY_STYLES, PIPELINE_SCHEDULES,
                                   RECOMPUTE_GRANULARITIES,
                                   RECOMPUTE_METHODS, ConfigError, DataConfig, LoggingConfig,
                                   ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig)
from megatron_alcot.data.utils import parse_blend, parse_split

TOKENIZER_TYPES = ("NullTokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                   "Llama2Tokenizer", "HuggingFaceTokenizer")
_NEEDS_TOKENIZER_MODEL = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                          "HuggingFaceTokenizer")


@dataclass
class Arguments:
    """Every config of a run, as parsed from the command line."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    argv: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain nested dict (what checkpoints store as the run's configuration)."""
        return {name: asdict(getattr(self, name))
                for name in ("model", "parallel", "data", "train", "optim", "logging")}


class _Parser(argparse.ArgumentParser):
    """argparse that suggests the closest known flag for a misspelt one."""

    def parse_known_or_suggest(self, argv):
        namespace, extras = self.parse_known_args(argv)
        if extras:
            known = [opt for action in self._actions for opt in action.option_strings]
            bad = [a for a in extras if a.startswith("-")] or extras
            flag = bad[0].split("=", 1)[0]
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            self.error(f"unrecognized argument {bad[0]!r}{hint}")
        return namespace


# (flag, section, field, argparse kwargs). section None: compatibility flag handled in _compat_checks.
def _specs():
    m, p, d, t, o, lg = "model", "parallel", "data", "train", "optim", "logging"
    return [
        # --- network size ---
        ("--num-layers", m, "num_layers", dict(type=int)),
        ("--hidden-size", m, "hidden_size", dict(type=int)),
        ("--ffn-hidden-size", m, "ffn_hidden_size", dict(type=int)),
        ("--num-attention-heads", m, "num_attention_heads", dict(type=int)),
        ("--num-query-groups", m, "num_query_groups", dict(type=int)),
        ("--group-query-attention", None, "group_query_attention", dict(action="store_true")),
        ("--kv-channels", m, "kv_channels", dict(type=int)),
        ("--seq-length", m, "seq_length", dict(type=int)),
        ("--max-position-embeddings", m, "max_position_embeddings", dict(type=int)),
        ("--rotary-base", m, "rotary_base", dict(type=float)),
        ("--norm-epsilon", m, "norm_epsilon", dict(type=float)),
        ("--untie-embeddings-and-output-weights", m, "untie_embeddings_and_output_weights",
         dict(action="store_true", default=False)),
        ("--init-method-std", m, "init_method_std", dict(type=float)),
        ("--make-vocab-size-divisible-by", m, "make_vocab_size_divisible_by", dict(type=int)),
        ("--attention-dropout", m, "attention_dropout", dict(type=float)),
        ("--hidden-dropout", m, "hidden_dropout", dict(type=float)),
        ("--attention-backend", m, "attention_backend", dict(choices=ATTENTION_BACKENDS)),
        ("--cpu-gemm-backend", m, "cpu_gemm_backend", dict(choices=GEMM_BACKENDS)),
        # --- latent steps ---
        ("--latent-method", m, "latent_method", dict(choices=LATENT_METHODS)),
        ("--latent-max-steps", m, "latent_max_steps", dict(type=int)),
        ("--latent-threshold", m, "latent_threshold", dict(type=float)),
        ("--latent-router-init-prob", m, "latent_router_init_prob", dict(type=float)),
        ("--latent-loss-weight", m, "latent_loss_weight", dict(type=float)),
        ("--latent-loss-beta", m, "latent_loss_beta", dict(type=float)),
        ("--latent-loss-scope", m, "latent_loss_scope", dict(choices=LATENT_LOSS_SCOPES)),
        ("--latent-readout", m, "latent_readout", dict(choices=LATENT_READOUTS)),
        ("--latent-embed-scale", m, "latent_embed_scale", dict(type=float)),
        ("--latent-prob-chunk", m, "latent_prob_chunk", dict(type=int)),
        ("--cross-entropy-loss-fusion", m, "cross_entropy_loss_fusion",
         dict(action="store_true", default=None)),
        ("--no-cross-entropy-loss-fusion", m, "cross_entropy_loss_fusion",
         dict(action="store_false", default=None)),
        # --- LLaMA features that are always on (accepted for Megatron scripts) ---
        ("--normalization", None, "normalization", dict(default="RMSNorm")),
        ("--position-embedding-type", None, "position_embedding_type", dict(default="rope")),
        ("--swiglu", None, "swiglu", dict(action="store_true")),
        ("--disable-bias-linear", None, "disable_bias_linear", dict(action="store_true")),
        ("--use-rotary-position-embeddings", None, "use_rope", dict(action="store_true")),
        ("--no-position-embedding", None, "no_position_embedding", dict(action="store_true")),
        ("--use-flash-attn", None, "use_flash_attn", dict(action="store_true")),
        ("--attention-softmax-in-fp32", None, "softmax_fp32", dict(action="store_true")),
        ("--no-masked-softmax-fusion", None, "no_msf", dict(action="store_true")),
        ("--no-bias-swiglu-fusion", None, "no_bsf", dict(action="store_true")),
        ("--no-bias-dropout-fusion", None, "no_bdf", dict(action="store_true")),
        ("--no-gradient-accumulation-fusion", None, "no_gaf", dict(action="store_true")),
        ("--use-mcore-models", None, "use_mcore", dict(action="store_true")),
        ("--transformer-impl", None, "transformer_impl",
         dict(choices=("local", "transformer_engine"), default="local")),
        ("--log-throughput", None, "log_throughput", dict(action="store_true")),
        ("--ckpt-format", None, "ckpt_format", dict(default="torch")),
        # --- parallelism ---
        ("--tensor-model-parallel-size", p, "tensor_model_parallel_size", dict(type=int)),
        ("--pipeline-model-parallel-size", p, "pipeline_model_parallel_size", dict(type=int)),
        ("--pipeline-layer-split", p, "pipeline_layer_split", dict()),
        ("--pipeline-schedule", p, "pipeline_schedule", dict(choices=PIPELINE_SCHEDULES)),
        ("--pipeline-max-in-flight", p, "pipeline_max_in_flight", dict(type=int)),
        ("--num-layers-per-virtual-pipeline-stage", p, "num_layers_per_virtual_pipeline_stage",
         dict(type=int)),
        ("--sequence-parallel", p, "sequence_parallel", dict(action="store_true", default=None)),
        ("--use-distributed-optimizer", p, "use_distributed_optimizer",
         dict(action="store_true", default=None)),
        ("--zero-stage", p, "zero_stage", dict(type=int, choices=(1, 2))),
        ("--deepspeed-config", p, "deepspeed_config", dict(metavar="PATH")),
        ("--distributed-backend", p, "distributed_backend", dict(choices=("auto", "gloo", "nccl"))),
        ("--distributed-timeout-minutes", p, "distributed_timeout_minutes", dict(type=int)),
        ("--overlap-grad-reduce", t, "overlap_grad_reduce", dict(action="store_true", default=None)),
        ("--no-overlap-grad-reduce", t, "overlap_grad_reduce",
         dict(action="store_false", default=None)),
        ("--ddp-bucket-size-mb", t, "ddp_bucket_size_mb", dict(type=float)),
        ("--overlap-param-gather", t, "overlap_param_gather", dict(action="store_true", default=None)),
        ("--grad-reduce-in-bf16", t, "grad_reduce_in_bf16", dict(action="store_true", default=None)),
        # --- batch and run length ---
        ("--micro-batch-size", t, "micro_batch_size", dict(type=int)),
        ("--global-batch-size", t, "global_batch_size", dict(type=int)),
        ("--train-iters", t, "train_iters", dict(type=int)),
        ("--train-samples", t, "train_samples", dict(type=int)),
        ("--seed", t, "seed", dict(type=int)),
        ("--deterministic", t, "deterministic", dict(action="store_true", default=None)),
        ("--torch-compile", t, "torch_compile", dict(action="store_true", default=None)),
        # --- optimizer and schedule ---
        ("--optimizer", o, "optimizer", dict(choices=("adam",))),
        ("--lr", o, "lr", dict(type=float)),
        ("--min-lr", o, "min_lr", dict(type=float)),
        ("--lr-decay-style", o, "lr_decay_style", dict(choices=LR_DECAY_STYLES)),
        ("--lr-decay-iters", o, "lr_decay_iters", dict(type=int)),
        ("--lr-decay-samples", None, "lr_decay_samples", dict(type=int)),
        ("--lr-warmup-iters", o, "lr_warmup_iters", dict(type=int)),
        ("--lr-warmup-samples", None, "lr_warmup_samples", dict(type=int)),
        ("--lr-warmup-fraction", o, "lr_warmup_fraction", dict(type=float)),
        ("--lr-warmup-init", o, "lr_warmup_init", dict(type=float)),
        ("--weight-decay", o, "weight_decay", dict(type=float)),
        ("--adam-beta1", o, "adam_beta1", dict(type=float)),
        ("--adam-beta2", o, "adam_beta2", dict(type=float)),
        ("--adam-eps", o, "adam_eps", dict(type=float)),
        ("--clip-grad", o, "clip_grad", dict(type=float)),
        # --- precision ---
        ("--bf16", t, "bf16", dict(action="store_true", default=None)),
        ("--fp16", t, "fp16", dict(action="store_true", default=None)),
        ("--loss-scale", t, "loss_scale", dict(type=float)),
        ("--initial-loss-scale", t, "initial_loss_scale", dict(type=float)),
        ("--min-loss-scale", t, "min_loss_scale", dict(type=float)),
        ("--loss-scale-window", t, "loss_scale_window", dict(type=int)),
        ("--hysteresis", t, "hysteresis", dict(type=int)),
        # --- recompute ---
        ("--recompute-granularity", t, "recompute_granularity", dict(choices=RECOMPUTE_GRANULARITIES)),
        ("--recompute-method", t, "recompute_method", dict(choices=RECOMPUTE_METHODS)),
        ("--recompute-num-layers", t, "recompute_num_layers", dict(type=int)),
        # --- data ---
        ("--data-path", d, "data_path", dict(nargs="*")),
        ("--split", d, "split", dict()),
        ("--train-data-path", d, "train_data_path", dict(nargs="*")),
        ("--valid-data-path", d, "valid_data_path", dict(nargs="*")),
        ("--test-data-path", d, "test_data_path", dict(nargs="*")),
        ("--data-cache-path", d, "data_cache_path", dict()),
        ("--mock-data", d, "mock_data", dict(action="store_true", default=None)),
        ("--tokenizer-type", d, "tokenizer_type", dict(choices=TOKENIZER_TYPES)),
        ("--tokenizer-model", d, "tokenizer_model", dict()),
        ("--vocab-size", d, "vocab_size", dict(type=int)),
        ("--reset-position-ids", d, "reset_position_ids", dict(action="store_true", default=None)),
        ("--reset-attention-mask", d, "reset_attention_mask", dict(action="store_true", default=None)),
        ("--eod-mask-loss", d, "eod_mask_loss", dict(action="store_true", default=None)),
        ("--num-workers", d, "num_workers", dict(type=int)),
        ("--no-mmap-bin-files", d, "mmap_bin_files", dict(action="store_false", default=None)),
        # --- checkpoints, evaluation, exits ---
        ("--save", t, "save", dict()),
        ("--load", t, "load", dict()),
        ("--save-interval", t, "save_interval", dict(type=int)),
        ("--no-load-optim", t, "no_load_optim", dict(action="store_true", default=None)),
        ("--no-load-rng", t, "no_load_rng", dict(action="store_true", default=None)),
        ("--finetune", t, "finetune", dict(action="store_true", default=None)),
        ("--eval-interval", t, "eval_interval", dict(type=int)),
        ("--eval-iters", t, "eval_iters", dict(type=int)),
        ("--exit-signal-handler", t, "exit_signal_handler", dict(action="store_true", default=None)),
        ("--exit-signal", t, "exit_signal", dict(choices=("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"))),
        ("--keep-last-checkpoints", t, "keep_last_checkpoints", dict(type=int)),
        ("--exit-duration-in-mins", t, "exit_duration_in_mins", dict(type=float)),
        ("--exit-interval", t, "exit_interval", dict(type=int)),
        ("--max-nan-skips", t, "max_nan_skips", dict(type=int)),
        ("--peak-flops", t, "peak_flops", dict(type=float)),
        # --- logging ---
        ("--log-interval", lg, "log_interval", dict(type=int)),
        ("--tensorboard-dir", lg, "tensorboard_dir", dict()),
        ("--metrics-file", lg, "metrics_file", dict()),
        ("--timing-log", lg, "log_timers", dict(action="store_true", default=None)),
        ("--quiet", lg, "quiet", dict(action="store_true", default=None)),
    ]


_SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig,
             "train": TrainConfig, "optim": OptimizerConfig, "logging": LoggingConfig}
_METAVARS = {int: "N", float: "X"}


def _field_notes(cls) -> dict:
    """``field -> (default, comment)`` read from the config class: the comment after each field
    in config.py is the one description of a flag, so --help cannot drift from the configs."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        source = ""
    notes = {}
    for f in fields(cls):
        match = re.search(rf"^\s+{f.name}:[^#\n]*#\s*(.*)$", source, re.MULTILINE)
        comment = match.group(1).strip() if match else ""
        comment = re.sub(r"^(--[\w-]+[ ,;/]*)+", "", comment)         # the flag names themselves
        comment = re.sub(r"^\{[^}]*\}[ ;:,]*", "", comment)          # choices (argparse shows them)
        comment = re.sub(r"^\(([^)]*)\)[ ;:,]*", r"\1; ", comment).strip(" ;")
        default = f.default if f.default is not MISSING else None
        notes[f.name] = (default, comment)
    return notes


# Megatron flags with no config of their own: what each one means here. Flags not listed are
# checked in _apply_compat (an error naming the flag, or the config they set).
_COMPAT_HELP = {
    "--swiglu": "always on here (SwiGLU MLP)", "--disable-bias-linear": "always on here (no biases)",
    "--use-rotary-position-embeddings": "always on here (RoPE)",
    "--no-position-embedding": "always on here (no learned position table)",
    "--attention-softmax-in-fp32": "always on here (softmax in fp32)",
    "--no-masked-softmax-fusion": "always holds here (no fused masked softmax kernel)",
    "--no-bias-swiglu-fusion": "always holds here (no fused bias-SwiGLU kernel)",
    "--no-bias-dropout-fusion": "always holds here (no fused bias-dropout kernel)",
    "--no-gradient-accumulation-fusion": "always holds here (no fused weight-gradient kernel)",
    "--log-throughput": "always on here (tokens/s, TFLOP/s and MFU in every log line)",
    "--use-flash-attn": "the fastest attention core: same as --attention-backend auto",
    "--use-mcore-models": "not supported: an error (the model is this project's own)",
    "--transformer-impl": "only local; transformer_engine is an error",
    "--ckpt-format": "only torch (this project's sharded format); anything else is an error",
    "--normalization": "only RMSNorm; anything else is an error",
    "--position-embedding-type": "only rope; anything else is an error",
    "--group-query-attention": "needs --num-query-groups N, which sets the groups",
    "--lr-decay-samples": "converted to --lr-decay-iters (needs --train-samples, --global-batch-size)",
    "--lr-warmup-samples": "converted to --lr-warmup-iters (needs --train-samples, --global-batch-size)",
}


def _help(section: Optional[str], name: str, kwargs: dict, notes: dict, flag: str = "") -> str:
    if section is None:
        return "Megatron-LM flag: " + _COMPAT_HELP.get(flag, "accepted for Megatron-LM scripts")
    default, comment = notes.get(section, {}).get(name, (None, ""))
    if kwargs.get("action") in ("store_true", "store_false"):
        return (comment or name.replace("_", " ")).replace("%", "%%")
    shown = "" if default in (None, "", []) else f" (default: {default})"
    return ((comment or name.replace("_", " ")) + shown).replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pretrain_alcot.py", allow_abbrev=False,
                     description="Pretrain a LLaMA model with adaptive latent chain-of-thought "
                                 "(Megatron-LM flags).")
    notes = {section: _field_notes(cls) for section, cls in _SECTIONS.items()}
    for flag, section, name, kwargs in _specs():
        kwargs = dict(kwargs)
        dest = f"{section}__{name}" if section else f"compat__{name}"
        kwargs.setdefault("help", _help(section, name, kwargs, notes, flag))
        if "action" not in kwargs and "choices" not in kwargs and "metavar" not in kwargs:
            kwargs["metavar"] = _METAVARS.get(kwargs.get("type"), "VALUE")
        kwargs.setdefault("default", None)
        parser.add_argument(flag, dest=dest, **kwargs)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> Arguments:
    """Flags -> :class:`Arguments`. Bad syntax exits with code 2 (argparse's convention)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = vars(parser.parse_known_or_suggest(argv))
    args = Arguments(argv=argv)
    for key, value in ns.items():
        section, name = key.split("__", 1)
        if section == "compat" or value is None:
            continue
        setattr(getattr(args, section), name, value)
    args.compat = {k.split("__", 1)[1]: v for k, v in ns.items() if k.startswith("compat__")}
    try:
        _apply_compat(args)
    except ConfigError as exc:
        parser.error(str(exc))
    return args


def _apply_compat(args: Arguments) -> None:
    c = args.compat
    if c["normalization"] != "RMSNorm":
        raise ConfigError(f"--normalization {c['normalization']}: only RMSNorm (LLaMA) is implemented")
    if c["position_embedding_type"] != "rope":
        raise ConfigError(f"--position-embedding-type {c['position_embedding_type']}: only rope "
                          "(LLaMA) is implemented")
    if c["ckpt_format"] != "torch":
        raise ConfigError(f"--ckpt-format {c['ckpt_format']}: checkpoints are written in this "
                          "project's sharded torch format only (resharded across TP/PP on load); "
                          "use --ckpt-format torch or omit the flag")
    if c["use_mcore"]:
        raise ConfigError("--use-mcore-models: the model is this project's own implementation "
                          "(megatron_alcot.model), not Megatron-Core's; drop the flag")
    if c["transformer_impl"] != "local":
        raise ConfigError(f"--transformer-impl {c['transformer_impl']}: Transformer Engine is not "
                          "used; the layers are this project's own (--transformer-impl local, or "
                          "omit the flag)")
    if c["use_flash_attn"]:
        if args.model.attention_backend != "auto":
            raise ConfigError(f"--use-flash-attn asks for the fastest attention core, which is "
                              f"--attention-backend auto; it contradicts --attention-backend "
                              f"{args.model.attention_backend}: drop one of the two")
        print("--use-flash-attn: attention core --attention-backend auto (the fastest one "
              "measured on this machine)", file=sys.stderr)
    if c["group_query_attention"] and args.model.num_query_groups is None:
        raise ConfigError("--group-query-attention needs --num-query-groups N")
    t, o = args.train, args.optim
    gbs = t.global_batch_size
    for flag, key, target in (("--lr-decay-samples", "lr_decay_samples", "lr_decay_iters"),
                              ("--lr-warmup-samples", "lr_warmup_samples", "lr_warmup_iters")):
        if c[key] is None:
            continue
        if t.train_samples is None or gbs is None:
            raise ConfigError(f"{flag} needs --train-samples and --global-batch-size "
                              f"(or use the --{target.replace('_', '-')} flag)")
        setattr(o, target, -(-c[key] // gbs))


def world_size_from_env() -> int:
    """World size announced by the launcher (torchrun, Slurm ``srun``, Open MPI, MPICH / Intel MPI);
    1 when run directly. Same rules as ``parallel.launch.discover`` (``LaunchError`` in an sbatch
    shell outside ``srun``)."""
    from megatron_alcot.parallel.launch import discover
    return discover().world_size


def validate_args(args: Arguments, world_size: int) -> None:
    """Check the whole configuration before any compute; raise ConfigError naming the flag."""
    par = args.parallel
    par.validate(world_size)
    args.model.validate(par)
    par.validate_layer_split(args.model.num_layers)
    dp = par.data_parallel_size(world_size)
    args.train.validate(dp)
    args.optim.validate(args.train.resolved_train_iters(dp))
    args.logging.validate()
    _validate_data(args.data, args.model, args.train)
    if args.train.recompute_granularity == "selective" and args.model.num_layers < 1:
        raise ConfigError("--recompute-granularity selective needs at least one layer")
    if args.train.recompute_num_layers and args.train.recompute_num_layers > args.model.num_layers:
        raise ConfigError(f"--recompute-num-layers {args.train.recompute_num_layers} is larger than "
                          f"--num-layers {args.model.num_layers}")
    _validate_deepspeed(args)


def _validate_deepspeed(args: Arguments) -> None:
    """``--deepspeed-config``: DeepSpeed is the data-parallel engine; refuse what it cannot join."""
    path, par, t = args.parallel.deepspeed_config, args.parallel, args.train
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
    if data.tokenizer_type in _NEEDS_TOKENIZER_MODEL:
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
