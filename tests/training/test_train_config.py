"""train() takes typed configs: training does not import the command-line layer, and a RunConfig
built in Python trains exactly like the same flags parsed by pretrain_alcot.py's parser."""
import dataclasses
import subprocess
import sys

from megatron_alcot.arguments import parse_args
from megatron_alcot.config.run import RunConfig
from megatron_alcot.training.train import train

from _tiny import tiny_argv


def test_training_does_not_import_the_command_line():
    code = ("import sys, megatron_alcot.training.train, megatron_alcot.training.setup; "
            "print([m for m in sys.modules if m == 'megatron_alcot.arguments'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_run_config_trains_like_the_parsed_flags():
    argv = tiny_argv(train_iters=3, exit_interval=2)
    parsed = parse_args(argv)
    config = RunConfig(**{f.name: getattr(parse_args(argv), f.name) for f in dataclasses.fields(RunConfig)})
    assert type(config) is RunConfig
    via_flags, direct = train(parsed), train(config)
    assert direct.iterations == via_flags.iterations and direct.exit_reason == "interval"
    assert direct.config == via_flags.config == parsed.to_dict()
