"""``--torch-compile`` together with activation recomputation, and with tensor parallelism (TP = 2),
trains the eager curve."""
import shutil

import pytest

from _tiny import tiny_argv
from dist_utils import run_distributed
from megatron_alcot.arguments import parse_args
from megatron_alcot.training.train import train

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="inductor needs a C++ compiler on CPU")
KW = dict(train_iters=3, num_layers=2, latent_threshold=0.5, latent_router_init_prob=0.5)


def _curve(history):
    return [(s["loss"], s["grad_norm"], s.get("mean_latent_steps")) for s in history.iterations]


def _assert_follows(curve, eager):
    assert len(curve) == len(eager) == 3
    for (l1, g1, s1), (l2, g2, s2) in zip(eager, curve):
        assert l2 == pytest.approx(l1, rel=1e-4) and g2 == pytest.approx(g1, rel=1e-3)
        assert s1 == s2


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_compile_with_recompute_follows_the_eager_curve(granularity):
    eager = _curve(train(parse_args(tiny_argv(**KW))))
    compiled = _curve(train(parse_args(tiny_argv(torch_compile=True, recompute_granularity=granularity, **KW))))
    _assert_follows(compiled, eager)


def _train_in_world(rank, world, argv):
    import torch
    torch.set_num_threads(1)
    return _curve(train(parse_args(argv)))


@pytest.mark.slow
@needs_compiler
def test_compile_with_tensor_parallel_follows_the_eager_curve():
    eager = _curve(train(parse_args(tiny_argv(**KW))))
    argv = tiny_argv(torch_compile=True, tensor_model_parallel_size=2, **KW)
    ranks = run_distributed(_train_in_world, 2, argv, timeout=600)
    assert ranks[0] == ranks[1]
    _assert_follows(ranks[0], eager)
