"""Megatron-LM command-line flags -> typed configs (:mod:`megatron_alcot.config`).

    >>> args = parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    ...                    "--micro-batch-size", "2", "--train-iters", "10", "--mock-data",
    ...                    "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"])
    >>> args.model.num_layers, args.train.micro_batch_size, args.optim.lr_decay_style
    (2, 2, 'cosine')
    >>> validate_args(args, world_size=1)          # raises ConfigError naming the flag

Each flag is declared once, on the config field it sets (``flag(...)`` in ``megatron_alcot/config``,
with its help text and choices); :func:`build_parser` makes the parser from those declarations and
:func:`parse_args` fills the typed configs back from the parsed values.

Flag names, meanings and defaults follow Megatron-LM wherever Megatron has the flag (weight tying
too: embeddings are tied unless ``--untie-embeddings-and-output-weights`` is given). Flags Megatron
scripts pass for features that are always on here (RMSNorm, SwiGLU, RoPE, no biases, fused kernels)
are accepted and checked for consistency (:class:`~megatron_alcot.config.CompatFlags`). Unknown
flags stop with a close-match suggestion; every error exits with code 2 before any compute.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import dataclass, field, fields
from typing import Optional, Sequence

from megatron_alcot.config import CompatFlags, ConfigError, FlagSpec, flag_specs
from megatron_alcot.config.run import RunConfig
# The checks of a whole configuration live with the configs; the command line re-exports them.
from megatron_alcot.config.run import validate_run as validate_args  # noqa: F401


@dataclass
class Arguments(RunConfig):
    """A :class:`~megatron_alcot.config.run.RunConfig` as parsed from the command line. Each config
    field's flag is declared on the field (``megatron_alcot.config``); the parser has one group per
    config, in this order."""

    compat: CompatFlags = field(default_factory=CompatFlags)     # applied on parsing, not stored
    argv: list = field(default_factory=list)


def config_sections() -> dict:
    """``{"model": ModelConfig, ...}``: every field of :class:`Arguments` that holds flags."""
    return {f.name: f.default_factory for f in fields(Arguments) if f.name != "argv"}


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


_METAVARS = {int: "N", float: "X"}


def _add_flags(group, dest: str, spec: FlagSpec, default_note: Optional[str] = None) -> None:
    """The argparse options of one config field. Every default is None, so a flag left out keeps the
    field's own default; the help shows that default (or ``default_note``)."""
    text = spec.help.replace("%", "%%")
    if spec.kind == "switch":
        shown = " (default: on)" if spec.default and spec.flags else ""
        for name in spec.flags:
            group.add_argument(name, dest=dest, action="store_true", default=None, help=text + shown)
        if spec.off is not None:
            off_help = f"turn off {spec.flags[0]} ({text})" if spec.flags else text
            group.add_argument(spec.off, dest=dest, action="store_false", default=None, help=off_help)
        return
    kwargs = dict(dest=dest, default=None, type=spec.type, choices=spec.choices)
    if spec.choices is None:
        kwargs["metavar"] = spec.metavar or _METAVARS.get(spec.type, "VALUE")
    if spec.kind == "list":
        kwargs["nargs"] = "*"
    default = default_note if default_note is not None else spec.default
    shown = "" if default in (None, "") else f" (default: {default})".replace("%", "%%")
    group.add_argument(*spec.flags, help=text + shown, **kwargs)


def add_config_flags(parser, cls, names: Sequence[str], default_note: str) -> None:
    """Give another tool the flags of some fields of config ``cls``, exactly as pretrain_alcot.py
    declares them (name, type, choices, help); unset they parse to None (``default_note`` says what
    the tool does then). ``args.<field>`` holds each value.

        add_config_flags(parser, ModelConfig, ["latent_method", "seq_length"], "from the HF config")
    """
    specs = {spec.name: spec for spec in flag_specs(cls)}
    for name in names:
        _add_flags(parser, name, specs[name], default_note)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``pretrain_alcot.py``, built from the flag metadata of the config fields."""
    parser = _Parser(prog="pretrain_alcot.py", allow_abbrev=False,
                     description="Pretrain a LLaMA model with adaptive latent chain-of-thought "
                                 "(Megatron-LM flags).")
    for section, cls in config_sections().items():
        group = parser.add_argument_group(f"{section} ({cls.__name__})", cls.__doc__.split("\n")[0])
        for spec in flag_specs(cls):
            _add_flags(group, f"{section}__{spec.name}", spec)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> Arguments:
    """Flags -> :class:`Arguments`. Bad syntax exits with code 2 (argparse's convention)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    given = {}
    for key, value in vars(parser.parse_known_or_suggest(argv)).items():
        section, name = key.split("__", 1)
        if value is not None:
            given.setdefault(section, {})[name] = value
    args = Arguments(argv=argv, **{section: cls(**given.get(section, {}))
                                   for section, cls in config_sections().items()})
    try:
        _apply_compat(args)
    except ConfigError as exc:
        parser.error(str(exc))
    return args


def _apply_compat(args: Arguments) -> None:
    """The Megatron-only flags (:class:`CompatFlags`): refuse what is not implemented, convert the rest."""
    c = args.compat
    if c.normalization != "RMSNorm":
        raise ConfigError(f"--normalization {c.normalization}: only RMSNorm (LLaMA) is implemented")
    if c.position_embedding_type != "rope":
        raise ConfigError(f"--position-embedding-type {c.position_embedding_type}: only rope "
                          "(LLaMA) is implemented")
    if c.ckpt_format != "torch":
        raise ConfigError(f"--ckpt-format {c.ckpt_format}: checkpoints are written in this "
                          "project's sharded torch format only (resharded across TP/PP on load); "
                          "use --ckpt-format torch or omit the flag")
    if c.use_mcore:
        raise ConfigError("--use-mcore-models: the model is this project's own implementation "
                          "(megatron_alcot.model), not Megatron-Core's; drop the flag")
    if c.transformer_impl != "local":
        raise ConfigError(f"--transformer-impl {c.transformer_impl}: Transformer Engine is not "
                          "used; the layers are this project's own (--transformer-impl local, or "
                          "omit the flag)")
    if c.use_flash_attn:
        if args.model.attention_backend != "auto":
            raise ConfigError(f"--use-flash-attn asks for the fastest attention core, which is "
                              f"--attention-backend auto; it contradicts --attention-backend "
                              f"{args.model.attention_backend}: drop one of the two")
        print("--use-flash-attn: attention core --attention-backend auto (the fastest one "
              "measured on this machine)", file=sys.stderr)
    if c.group_query_attention and args.model.num_query_groups is None:
        raise ConfigError("--group-query-attention needs --num-query-groups N")
    t, o = args.train, args.optim
    gbs = t.global_batch_size
    for flag, key, target in (("--lr-decay-samples", "lr_decay_samples", "lr_decay_iters"),
                              ("--lr-warmup-samples", "lr_warmup_samples", "lr_warmup_iters")):
        samples = getattr(c, key)
        if samples is None:
            continue
        if t.train_samples is None or gbs is None:
            raise ConfigError(f"{flag} needs --train-samples and --global-batch-size "
                              f"(or use the --{target.replace('_', '-')} flag)")
        setattr(o, target, -(-samples // gbs))


def world_size_from_env() -> int:
    """World size announced by the launcher (torchrun, Slurm ``srun``, Open MPI, MPICH / Intel MPI);
    1 when run directly. Same rules as ``parallel.launch.discover`` (``LaunchError`` in an sbatch
    shell outside ``srun``)."""
    from megatron_alcot.parallel.launch import discover
    return discover().world_size
