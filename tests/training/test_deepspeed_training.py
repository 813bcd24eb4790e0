"""``--deepspeed-config`` at DP = 2 (ZeRO-1, ZeRO-2 and ZeRO-3) trains the single-process loss curve.

All stages run one after the other in the same two workers (one spawn, one DeepSpeed start-up).

Workers end with barrier, destroy_process_group and os._exit (DeepSpeed on CPU can abort at
interpreter exit, see tests/optim/test_deepspeed.py); the first DeepSpeed run on a machine builds
its shm_comm op (about 25 s, cached under ~/.cache/torch_extensions).
"""
import json

import pytest

from megatron_alcot.arguments import parse_args, validate_args
from megatron_alcot.config import ConfigError
from megatron_alcot.training.train import train

from _tiny import tiny_argv
from dist_utils import run_distributed_hard_exit

ARGV = tiny_argv(train_iters=4, clip_grad=0.5, eval_iters=1, eval_interval=2)


def _curve(history):
    """Per training step (loss terms, grad norm, depth, lr), then per evaluation (loss, depth)."""
    return [(s["loss"], s["lm_loss"], s["latent_loss"], s["grad_norm"], s["mean_latent_steps"],
             s["lr"]) for s in history.steps] + \
        [(e["loss"], e["lm_loss"], e["mean_latent_steps"]) for e in history.evals]


def _curves(rank, world, argvs):
    return [_curve(train(argv)) for argv in argvs]


def _run(argvs, world=2, timeout=240):
    return run_distributed_hard_exit(_curves, world, argvs, env={"DS_ACCELERATOR": "cpu"},
                                     timeout=timeout)


def _config(tmp_path, stage):
    path = tmp_path / f"ds_zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}))
    return str(path)


def test_deepspeed_zero_stages_match_single_process(tmp_path):
    pytest.importorskip("deepspeed")
    reference = _curve(train(ARGV))
    assert reference[-1][0] < reference[0][0]
    stages = (1, 2, 3)
    per_rank = _run([ARGV + ["--deepspeed-config", _config(tmp_path, s)] for s in stages])
    for i, stage in enumerate(stages):
        curve = per_rank[0][i]
        assert per_rank[1][i] == curve, f"ZeRO-{stage}: ranks disagree"
        assert len(curve) == len(reference)
        for ref_step, step in zip(reference, curve):
            assert step == pytest.approx(ref_step, rel=2e-4, abs=1e-6), f"ZeRO-{stage}"


@pytest.mark.parametrize("extra", [["--tensor-model-parallel-size", "2"],
                                   ["--pipeline-model-parallel-size", "2"],
                                   ["--use-distributed-optimizer"], ["--fp16"],
                                   ["--save", "ckpt"], ["--load", "ckpt"]])
def test_deepspeed_rejects_unsupported_combinations(tmp_path, extra):
    args = parse_args(ARGV + ["--deepspeed-config", _config(tmp_path, 1)] + extra)
    with pytest.raises(ConfigError, match="--deepspeed-config does not combine"):
        validate_args(args, world_size=4)


def test_deepspeed_config_must_exist(tmp_path):
    args = parse_args(ARGV + ["--deepspeed-config", str(tmp_path / "missing.json")])
    with pytest.raises(ConfigError, match="no such file"):
        validate_args(args, world_size=1)


def test_deepspeed_config_disagreeing_with_flags_is_a_config_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 5}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu = 5 disagrees"):
        train(ARGV + ["--deepspeed-config", str(path)])
