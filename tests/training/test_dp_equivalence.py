"""DP = 2 and DP = 2 × TP = 2 give the single-process loss curve at the same global batch."""
import pytest

from megatron_alcot.arguments import parse_args
from megatron_alcot.training.train import train

from _tiny import tiny_argv
from dist_utils import run_distributed

pytestmark = pytest.mark.slow

ARGV = tiny_argv(train_iters=5, clip_grad=0.5)


def _curve(history):
    return [(s["loss"], s["lm_loss"], s["latent_loss"], s["grad_norm"], s["mean_latent_steps"])
            for s in history.iterations]


def _train_in_world(rank, world, argv):
    return _curve(train(parse_args(argv)))


def test_data_and_tensor_parallel_match_single_process():
    reference = _curve(train(parse_args(ARGV)))
    assert reference[-1][0] < reference[0][0]
    dp2 = run_distributed(_train_in_world, 2, ARGV)
    tp2dp2 = run_distributed(_train_in_world, 4, ARGV + ["--tensor-model-parallel-size", "2"])
    for curves in (dp2, tp2dp2):
        assert all(c == curves[0] for c in curves)          # every rank reports the same numbers
        for ref_step, step in zip(reference, curves[0]):
            assert step == pytest.approx(ref_step, rel=2e-4, abs=1e-6)


@pytest.mark.parametrize("stage", ["1", "2"])
def test_distributed_optimizer_matches_single_process(stage):
    """--use-distributed-optimizer (ZeRO-1/2 over DP) trains the same curve as plain AdamW at DP=1."""
    reference = _curve(train(parse_args(ARGV)))
    zero = run_distributed(_train_in_world, 2, ARGV + ["--use-distributed-optimizer",
                                                       "--zero-stage", stage])
    assert zero[0] == zero[1]
    for ref_step, step in zip(reference, zero[0]):
        assert step == pytest.approx(ref_step, rel=2e-4, abs=1e-6)
