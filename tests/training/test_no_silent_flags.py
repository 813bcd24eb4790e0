"""No parsed flag is silently ignored: every flag of ``pretrain_alcot.py --help`` either changes the
run's configuration (``Arguments.to_dict()``) or stops with an error naming the flag, except the
documented Megatron flags whose meaning always holds here (ALWAYS_HOLD, each with its reason)."""
import argparse
import dataclasses

import pytest

from megatron_alcot.arguments import build_parser, parse_args

# Megatron flags that state what is always true of this implementation; parsing them changes nothing.
ALWAYS_HOLD = {
    "--swiglu": "the MLP is always SwiGLU",
    "--disable-bias-linear": "linear layers never have biases",
    "--use-rotary-position-embeddings": "positions are always RoPE",
    "--no-position-embedding": "there is no learned position table",
    "--attention-softmax-in-fp32": "attention's softmax always runs in fp32",
    "--no-masked-softmax-fusion": "there is no fused masked-softmax kernel to turn off",
    "--no-bias-swiglu-fusion": "there is no fused bias-SwiGLU kernel to turn off",
    "--no-bias-dropout-fusion": "there is no fused bias-dropout kernel to turn off",
    "--no-gradient-accumulation-fusion": "there is no fused weight-gradient kernel to turn off",
    "--log-throughput": "every log line already has tokens/s, TFLOP/s and MFU",
    "--use-flash-attn": "the fastest attention core is --attention-backend auto, the default",
}
# Flags whose use must be an error naming the flag (the feature is not implemented here).
MUST_RAISE = [["--use-mcore-models"], ["--transformer-impl", "transformer_engine"],
              ["--ckpt-format", "torch_dist"], ["--normalization", "LayerNorm"],
              ["--position-embedding-type", "learned_absolute"],
              ["--use-flash-attn", "--attention-backend", "sdpa"]]


def _flags():
    parser = build_parser()
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _candidate_values(action, default):
    """Values to try for ``action``: every choice but the default, or one value unlike the default."""
    if action.nargs == 0:       # a switch that restates the default (--overlap-grad-reduce) sets nothing new
        return [] if action.const == default and default is not None else [[]]
    if action.choices:
        return [[str(c)] for c in action.choices if c != default]
    if action.type is int:
        return [[str((default or 0) + 3)]]
    if action.type is float:
        return [[repr((default or 0.0) * 2 + 0.37)]]
    if action.nargs in ("*", "+"):
        return [["some_prefix"]]
    return [["some_value_" + action.dest]]


def _default(baseline, action):
    section, name = action.dest.split("__", 1)
    return baseline[section].get(name)


def test_every_flag_changes_the_config_or_raises(capsys):
    args = parse_args([])
    baseline = args.to_dict()
    defaults = dict(baseline, compat=dataclasses.asdict(args.compat))   # compat flags are not stored
    silent, checked = [], 0
    for action in _flags():
        flag = action.option_strings[0]
        for values in _candidate_values(action, _default(defaults, action)):
            checked += 1
            try:
                config = parse_args([flag, *values]).to_dict()
            except SystemExit:
                err = capsys.readouterr().err
                assert flag in err, (flag, values, err)      # the error names the flag
                continue
            if config != baseline:
                continue
            if flag not in ALWAYS_HOLD:
                silent.append(" ".join([flag, *values]))
    assert not silent, f"parsed but ignored (neither a config change nor an error): {silent}"
    assert checked > 100


def test_always_hold_flags_are_listed_in_help():
    helps = {a.option_strings[0]: a.help for a in _flags()}
    for flag in ALWAYS_HOLD:
        assert flag in helps and ("here" in helps[flag] or "auto" in helps[flag]), (flag, helps.get(flag))


@pytest.mark.parametrize("argv", MUST_RAISE, ids=lambda a: " ".join(a))
def test_unimplemented_megatron_flags_raise_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert argv[0] in err and ("use" in err or "drop" in err or "only" in err), err
