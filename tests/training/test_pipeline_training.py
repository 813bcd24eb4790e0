"""PP = 2 and PP = 2 x DP = 2 training give the single-process curve (losses, grad norm, latent
steps, validation) at the same global batch, for ALCoT with learned halting; a PP = 2 checkpoint
resumes at PP = 1 on the same curve."""
import json

import pytest

from megatron_alcot.arguments import parse_args, validate_args
from megatron_alcot.config import ConfigError
from megatron_alcot.training.train import train

from _tiny import tiny_argv
from dist_utils import run_distributed

# Router init 0.5 and threshold 0.25: step 2 runs for tokens whose reach stays >= 0.25, which after
# the first update is a per-token mixture of depths 1 and 2.
FLAGS = dict(num_layers=3, lr_decay_iters=10, clip_grad=0.5, latent_router_init_prob=0.5,
             latent_threshold=0.25, eval_iters=1, eval_interval=2)
ARGV = tiny_argv(train_iters=3, **FLAGS)
PP2 = ["--pipeline-model-parallel-size", "2"]


def _curve(history):
    steps = [(s["loss"], s["lm_loss"], s["latent_loss"], s["grad_norm"], s["mean_latent_steps"])
             for s in history.iterations]
    evals = [(e["loss"], e["lm_loss"], e["mean_latent_steps"]) for e in history.evals]
    return steps, evals


def _train_in_world(rank, world, argv):
    return _curve(train(parse_args(argv)))


def _assert_same(curve, reference):
    assert len(curve) == len(reference)
    for step, ref_step in zip(curve, reference):
        assert step == pytest.approx(ref_step, rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_pipeline_matches_single_process_and_resumes_at_pp1(tmp_path):
    ckpt, metrics = str(tmp_path / "ckpt"), tmp_path / "metrics.jsonl"
    ref_steps, ref_evals = _curve(train(parse_args(tiny_argv(train_iters=4, **FLAGS))))
    assert any(s[4] < 2.0 for s in ref_steps[:3])          # learned halting left some tokens shallow

    pp2 = run_distributed(_train_in_world, 2, ARGV + PP2 + ["--save", ckpt, "--metrics-file", str(metrics)])
    pp2dp2 = run_distributed(_train_in_world, 4, ARGV + PP2 + ["--pipeline-layer-split", "1,2"])
    for ranks in (pp2, pp2dp2):
        assert all(r == ranks[0] for r in ranks)             # every stage reports the same numbers
        _assert_same(ranks[0][0], ref_steps[:3])
        assert ranks[0][1][0] == pytest.approx(ref_evals[0], rel=1e-5, abs=1e-7)   # validation at iter 2

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["iteration"] for r in train_rows] == [1, 2, 3]
    assert [r["loss"] for r in train_rows] == pytest.approx([s[0] for s in ref_steps[:3]], rel=1e-5)
    assert [r["kind"] for r in rows].count("valid") == 2

    resumed, _ = _curve(train(parse_args(tiny_argv(train_iters=4, **FLAGS) + ["--load", ckpt])))
    _assert_same(resumed, ref_steps[3:])


@pytest.mark.parametrize("split,match", [("1,1", "sum to --num-layers 3"), ("3", "one per stage"),
                                         ("0,3", ">= 1 layer"), ("a,b", "comma-separated")])
def test_layer_split_is_validated(split, match):
    args = parse_args(ARGV + PP2 + ["--pipeline-layer-split", split])
    with pytest.raises(ConfigError, match=match):
        validate_args(args, world_size=2)


def test_pipeline_world_size_must_divide():
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size 2"):
        validate_args(parse_args(ARGV + PP2), world_size=3)
