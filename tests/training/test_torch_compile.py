"""``--torch-compile`` trains the same curve as eager mode (vanilla and ALCoT, whose compacted
shapes vary between laps), and the configuration accepts it with TP and recomputation."""
import shutil

import pytest

from _tiny import tiny_argv
from megatron_alcot.arguments import parse_args, validate_args
from megatron_alcot.training.train import train


def _curve(history):
    return [(s["loss"], s["grad_norm"], s.get("mean_latent_steps")) for s in history.iterations]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor needs a C++ compiler on CPU")
@pytest.mark.slow
@pytest.mark.parametrize("method", ["vanilla", "alcot"])
def test_compiled_layers_follow_the_eager_curve(method):
    kw = dict(latent_method=method, train_iters=3, latent_threshold=0.5)
    eager = _curve(train(parse_args(tiny_argv(**kw))))
    compiled = _curve(train(parse_args(tiny_argv(torch_compile=True, **kw))))
    assert len(eager) == len(compiled) == 3
    for (l1, g1, s1), (l2, g2, s2) in zip(eager, compiled):
        assert l2 == pytest.approx(l1, rel=1e-4) and g2 == pytest.approx(g1, rel=1e-3)
        assert s1 == s2


def test_accepted_with_tensor_parallel_and_recompute():
    """Both combinations are allowed (their curves: tests/training/test_compile_combinations.py)."""
    validate_args(parse_args(tiny_argv(torch_compile=True, tensor_model_parallel_size=2)), world_size=2)
    validate_args(parse_args(tiny_argv(torch_compile=True, recompute_granularity="full")), world_size=1)
