"""``--use-distributed-optimizer`` with PP = 2 and tied embeddings gives the single-process curve.

The tied embedding's two copies (first stage's input embedding, last stage's LM head) must get
their summed gradient before ZeRO's reduce-scatter, and the norm must count them once: losses,
gradient norms and latent depths of PP = 2 (DP = 1) and PP = 2 × DP = 2 under ZeRO-1 and ZeRO-2
equal the one-process run, and both copies stay equal.
"""
import pytest

from megatron_alcot.training.train import train

from training._tiny import tiny_argv
from dist_utils import run_distributed

FLAGS = dict(num_layers=3, lr_decay_iters=10, clip_grad=0.5, latent_router_init_prob=0.5,
             latent_threshold=0.25, train_iters=3)


def _curve(history):
    return [(s["loss"], s["grad_norm"], s["mean_latent_steps"]) for s in history.steps]


def _train_in_world(rank, world, argv):
    return _curve(train(argv))


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2])
def test_pp2_tied_zero_matches_one_process(zero):
    ref = _curve(train(tiny_argv(**FLAGS)))
    flags = ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--zero-stage", str(zero)]
    for world in (2, 4):
        ranks = run_distributed(_train_in_world, world, tiny_argv(**FLAGS) + flags)
        assert all(r == ranks[0] for r in ranks)
        for got, want in zip(ranks[0], ref):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
