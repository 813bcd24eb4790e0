"""``--torch-compile`` under pipeline parallelism (PP = 2) and through the DeepSpeed engine (ZeRO-2,
DP = 2) trains the single-process eager curve: compilation composes with the lap pipeline's
send/receive of activations and with DeepSpeed's gradient hooks."""
import json
import shutil

import pytest

from _tiny import tiny_argv
from dist_utils import run_distributed, run_distributed_hard_exit
from megatron_alcot.arguments import parse_args
from megatron_alcot.training.train import train

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="inductor needs a C++ compiler on CPU")
KW = dict(train_iters=3, num_layers=2, latent_threshold=0.5, latent_router_init_prob=0.5)


def _curve(history):
    return [(s["loss"], s["grad_norm"], s.get("mean_latent_steps")) for s in history.iterations]


def _train_in_world(rank, world, argv):
    return _curve(train(parse_args(argv)))


def _assert_follows(curve, eager):
    assert len(curve) == len(eager) == 3
    for (l1, g1, s1), (l2, g2, s2) in zip(eager, curve):
        assert l2 == pytest.approx(l1, rel=1e-4) and g2 == pytest.approx(g1, rel=1e-3)
        assert s1 == s2


@pytest.mark.slow
@needs_compiler
def test_compiled_pipeline_follows_the_eager_curve():
    eager = _curve(train(parse_args(tiny_argv(**KW))))
    argv = tiny_argv(torch_compile=True, pipeline_model_parallel_size=2, **KW)
    ranks = run_distributed(_train_in_world, 2, argv, timeout=300)
    assert ranks[0] == ranks[1]
    _assert_follows(ranks[0], eager)


@pytest.mark.slow
@needs_compiler
def test_compiled_deepspeed_follows_the_eager_curve(tmp_path):
    pytest.importorskip("deepspeed")
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9}))
    eager = _curve(train(parse_args(tiny_argv(**KW))))
    argv = tiny_argv(torch_compile=True, deepspeed_config=str(config), **KW)
    ranks = run_distributed_hard_exit(_train_in_world, 2, argv, env={"DS_ACCELERATOR": "cpu"}, timeout=300)
    assert ranks[0] == ranks[1]
    _assert_follows(ranks[0], eager)
