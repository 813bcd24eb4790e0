"""The command line is generated from the config fields: every field declares its flag (or says why it
has none), every declared flag is in the parser exactly once, and a real command line fills the typed
configs with exactly the values it names (everything else keeps the field's default)."""
import argparse
import dataclasses
import os
import re

import pytest

from megatron_alcot.arguments import Arguments, build_parser, config_sections, parse_args
from megatron_alcot.config import (CompatFlags, DataConfig, LoggingConfig, ModelConfig, OptimizerConfig,
                                   ParallelConfig, TrainConfig, flag, flag_specs, internal, is_internal)

# A 410M-style Slurm run (slurm/pretrain_410m.sh plus what slurm/_job.sh appends), with the switches
# that turn defaults off, a blend and a Megatron-only flag.
ARGV = """
    --num-layers 24 --hidden-size 1024 --ffn-hidden-size 2816 --num-attention-heads 16
    --num-query-groups 4 --seq-length 2048 --max-position-embeddings 4096 --untie-embeddings-and-output-weights
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --pipeline-layer-split 11,13
    --micro-batch-size 4 --global-batch-size 256 --recompute-granularity selective
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style linear --lr-warmup-fraction 0.02
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16
    --save-interval 500 --eval-interval 1000 --eval-iters 50 --log-interval 10 --peak-flops 989
    --latent-method alcot --latent-max-steps 4 --latent-threshold 0.2 --latent-loss-scope decided
    --no-cross-entropy-loss-fusion --no-overlap-grad-reduce --no-mmap-bin-files
    --use-distributed-optimizer --zero-stage 2 --sequence-parallel --mid-level-dataset-surplus 0.01
    --train-iters 1000 --data-path 30 data/a_text_document 70 data/b_text_document --split 98,1,1
    --num-workers 2 --tokenizer-type Llama2Tokenizer --tokenizer-model tok.model
    --save ckpt --load ckpt --keep-last-checkpoints 3 --metrics-file run-metrics.jsonl
    --tensorboard-dir tb/run --exit-signal-handler --exit-signal SIGUSR1 --distributed-timeout-minutes 30
    --timing-log --swiglu --disable-bias-linear
""".split()

EXPECTED = Arguments(
    model=ModelConfig(num_layers=24, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=16,
                      num_query_groups=4, seq_length=2048, max_position_embeddings=4096,
                      untie_embeddings_and_output_weights=True, latent_method="alcot", latent_max_steps=4,
                      latent_threshold=0.2, latent_loss_scope="decided", cross_entropy_loss_fusion=False),
    parallel=ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                            pipeline_layer_split="11,13", use_distributed_optimizer=True, zero_stage=2,
                            sequence_parallel=True, distributed_timeout_minutes=30),
    data=DataConfig(data_path=["30", "data/a_text_document", "70", "data/b_text_document"], split="98,1,1",
                    num_workers=2, tokenizer_type="Llama2Tokenizer", tokenizer_model="tok.model",
                    mmap_bin_files=False, mid_level_dataset_surplus=0.01),
    train=TrainConfig(micro_batch_size=4, global_batch_size=256, train_iters=1000, bf16=True,
                      recompute_granularity="selective", overlap_grad_reduce=False, save_interval=500,
                      eval_interval=1000, eval_iters=50, peak_flops=989.0, save="ckpt", load="ckpt",
                      keep_last_checkpoints=3, exit_signal_handler=True, exit_signal="SIGUSR1"),
    optim=OptimizerConfig(lr=3e-4, min_lr=3e-5, lr_decay_style="linear", lr_warmup_fraction=0.02,
                          weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0),
    logging=LoggingConfig(log_interval=10, metrics_file="run-metrics.jsonl", tensorboard_dir="tb/run",
                          log_timers=True),
    compat=CompatFlags(swiglu=True, disable_bias_linear=True),
    argv=ARGV)


def test_a_real_command_line_builds_exactly_the_expected_configs():
    args = parse_args(ARGV)
    for section in config_sections():
        assert getattr(args, section) == getattr(EXPECTED, section), section
    assert args == EXPECTED
    for section in ("model", "parallel", "data", "train", "optim", "logging"):     # types, not just values
        for f in dataclasses.fields(getattr(args, section)):
            got, want = getattr(getattr(args, section), f.name), getattr(getattr(EXPECTED, section), f.name)
            assert type(got) is type(want), (section, f.name, got, want)


def test_no_flags_gives_every_default():
    assert parse_args([]) == Arguments()


@pytest.mark.parametrize("section, cls", sorted(config_sections().items()))
def test_every_config_field_has_a_flag_or_is_marked_internal(section, cls):
    for f in dataclasses.fields(cls):
        flagged = "flag" in f.metadata
        assert flagged != is_internal(f), f"{cls.__name__}.{f.name}: give it flag(...) or internal(why=...)"
        if flagged:
            spec = f.metadata["flag"]
            assert spec["help"].strip(), f"{cls.__name__}.{f.name}: flag without help"
            assert all(n.startswith("--") for n in spec["flags"] + ((spec["off"],) if spec["off"] else ()))
        else:
            assert f.metadata["internal"].strip(), f"{cls.__name__}.{f.name}: internal() needs why="


def test_each_declared_flag_is_one_parser_option_and_nothing_else_is():
    declared = []
    for section, cls in config_sections().items():
        for spec in flag_specs(cls):
            names = spec.flags + ((spec.off,) if spec.off else ())
            declared += [(name, f"{section}__{spec.name}") for name in names]
    names = [name for name, _ in declared]
    assert len(names) == len(set(names)), "a flag is declared on two fields"
    parsed = {opt: action.dest for action in build_parser()._actions
              if not isinstance(action, argparse._HelpAction) for opt in action.option_strings}
    assert parsed == dict(declared)


def test_help_shows_each_flag_with_its_text_and_default():
    parser = build_parser()
    text = parser.format_help()
    helps = {opt: action.help for action in parser._actions for opt in action.option_strings}
    for cls in config_sections().values():
        for spec in flag_specs(cls):
            for name in spec.flags + ((spec.off,) if spec.off else ()):
                assert name in text and helps[name]
            assert spec.help.replace("%", "%%") in helps[(spec.flags or (spec.off,))[0]], spec.name
            if spec.kind != "switch" and spec.default not in (None, ""):
                assert helps[spec.flags[0]].endswith(f"(default: {spec.default})"), spec.name


def test_error_messages_name_only_flags_that_exist():
    """A message that tells the user to change a flag names one the parser has (one did not)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    known = {opt for action in build_parser()._actions for opt in action.option_strings}
    files = [os.path.join("megatron_alcot", "config", name) for name in
             ("model.py", "parallel.py", "data.py", "training.py", "compat.py")]
    files += [os.path.join("megatron_alcot", *path) for path in
              (("arguments.py",), ("data", "utils.py"), ("data", "builder.py"), ("data", "blended_dataset.py"))]
    for path in files:
        with open(os.path.join(root, path)) as f:
            named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", f.read()))
        assert named <= known, (path, sorted(named - known))


def test_convert_from_hf_takes_the_model_flags_as_pretrain_declares_them():
    from megatron_alcot.hf.convert_from_hf import LATENT_FLAGS, build_parser as hf_parser
    names = LATENT_FLAGS + ("seq_length", "make_vocab_size_divisible_by")
    ours = {a.dest: a for a in hf_parser()._actions}
    theirs = {a.dest: a for a in build_parser()._actions}
    for name in names:
        a, b = ours[name], theirs[f"model__{name}"]
        assert (a.option_strings, a.type, a.choices, a.default) == (b.option_strings, b.type, b.choices, None)
        assert a.help.split(" (default:")[0] == b.help.split(" (default:")[0]
    with pytest.raises(SystemExit):         # choices come with the declaration
        hf_parser().parse_args(["--load", "a", "--save", "b", "--latent-readout", "logits"])


def test_flag_metadata_drives_switches_lists_and_types():
    @dataclasses.dataclass
    class Example:
        steps: int = flag("--steps", "--num-steps", default=3, help="how many")
        scale: float = flag("--scale", default=None, help="how much")
        paths: list = flag("--paths", default_factory=list, help="where")
        fused: bool = flag("--fused", off="--no-fused", default=True, help="fuse")
        note: str = internal("x", why="set by the loader")

    specs = {s.name: s for s in flag_specs(Example)}
    assert specs["steps"].flags == ("--steps", "--num-steps") and specs["steps"].type is int
    assert specs["scale"].type is float and specs["scale"].kind == "value"
    assert specs["paths"].kind == "list" and specs["fused"].kind == "switch"
    assert specs["fused"].off == "--no-fused" and "note" not in specs
    with pytest.raises(TypeError, match="off= is for bool fields"):
        @dataclasses.dataclass
        class Bad:
            n: int = flag("--n", off="--no-n", default=1, help="n")
        flag_specs(Bad)
