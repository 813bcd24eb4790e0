"""``--deepspeed-config`` at DP = 2 (ZeRO-1, ZeRO-2 and ZeRO-3) trains the single-process loss curve,
and resumes from its checkpoints bit for bit.

All stages run one after the other in the same two workers (one spawn, one DeepSpeed start-up).

Workers end with barrier, destroy_process_group and os._exit (DeepSpeed on CPU can abort at
interpreter exit, see tests/optim/test_deepspeed.py); the first DeepSpeed run on a machine builds
its shm_comm op (about 25 s, cached under ~/.cache/torch_extensions).
"""
import json

import pytest
import torch

from megatron_alcot.checkpointing import load_full_state_dict
from megatron_alcot.checkpointing.metadata import CheckpointError

from megatron_alcot.arguments import parse_args, validate_args
from megatron_alcot.config import ConfigError
from megatron_alcot.training.train import train

from _tiny import tiny_argv
from dist_utils import run_distributed_hard_exit

ARGV = tiny_argv(train_iters=4, clip_grad=0.5, eval_iters=1, eval_interval=2)


def _curve(history):
    """Per training step (loss terms, grad norm, depth, lr), then per evaluation (loss, depth)."""
    return [(s["loss"], s["lm_loss"], s["latent_loss"], s["grad_norm"], s["mean_latent_steps"],
             s["lr"]) for s in history.iterations] + \
        [(e["loss"], e["lm_loss"], e["mean_latent_steps"]) for e in history.evals]


def _curves(rank, world, argvs):
    return [_curve(train(parse_args(argv))) for argv in argvs]


def _run(argvs, world=2, timeout=240):
    return run_distributed_hard_exit(_curves, world, argvs, env={"DS_ACCELERATOR": "cpu"},
                                     timeout=timeout)


def _config(tmp_path, stage):
    path = tmp_path / f"ds_zero{stage}.json"
    zero = {"stage": stage}
    if stage == 3:   # partition even this tiny model's parameters and release them after each use
        zero.update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0,
                    stage3_prefetch_bucket_size=0)
    path.write_text(json.dumps({"zero_optimization": zero, "steps_per_print": 10 ** 9}))
    return str(path)


@pytest.mark.slow
def test_deepspeed_zero_stages_match_single_process(tmp_path):
    pytest.importorskip("deepspeed")
    reference = _curve(train(parse_args(ARGV)))
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
                                   ["--use-distributed-optimizer"], ["--fp16"]])
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
        train(parse_args(ARGV + ["--deepspeed-config", str(path)]))


def _resume_traces(rank, world, cases):
    steps = lambda h: [(s["iteration"], s["loss"], s["grad_norm"], s["lr"]) for s in h.iterations]  # noqa: E731
    return [(steps(train(parse_args(straight))), steps(train(parse_args(first))) + steps(train(parse_args(second))))
            for straight, first, second in cases]


@pytest.mark.slow
def test_deepspeed_resume_is_bitwise_exact_and_checkpoints_serve_other_runs(tmp_path):
    """2 steps + save + resume + 2 steps = 4 straight steps, at ZeRO-2 and ZeRO-3, DP = 2; the
    checkpoint also holds the full weights (HF export, runs without DeepSpeed)."""
    pytest.importorskip("deepspeed")
    base = tiny_argv(train_iters=6)
    cases, dirs = [], {}
    for stage in (2, 3):
        ds = ["--deepspeed-config", _config(tmp_path, stage)]
        d = dirs[stage] = str(tmp_path / f"ckpt_zero{stage}")
        cases.append((base + ds + ["--exit-interval", "4"],
                      base + ds + ["--save", d, "--exit-interval", "2"],
                      base + ds + ["--save", d, "--load", d, "--exit-interval", "4"]))
    per_rank = run_distributed_hard_exit(_resume_traces, 2, cases, env={"DS_ACCELERATOR": "cpu"},
                                         timeout=300)
    for (straight, resumed), stage in zip(per_rank[0], (2, 3)):
        assert [s[0] for s in resumed] == [1, 2, 3, 4]
        assert resumed == straight, f"ZeRO-{stage}"
    assert per_rank[1] == per_rank[0]
    full2, meta2 = load_full_state_dict(dirs[2])
    full3, meta3 = load_full_state_dict(dirs[3])
    assert meta3["engine"]["name"] == "deepspeed" and meta3["engine"]["zero_stage"] == 3
    assert meta3["iteration"] == 4 and full2.keys() == full3.keys()
    for name, t in full2.items():            # ZeRO-3's gathered weights are the full tensors
        assert full3[name].shape == t.shape
        torch.testing.assert_close(full3[name], t, rtol=1e-3, atol=1e-5)
    with pytest.raises(CheckpointError, match="deepspeed's format"):
        train(parse_args(base + ["--load", dirs[3]]))
    weights_only = train(parse_args(base + ["--load", dirs[3], "--no-load-optim", "--exit-interval", "5"]))
    assert [s["iteration"] for s in weights_only.iterations] == [5]
