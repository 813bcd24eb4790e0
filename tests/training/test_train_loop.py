"""The loop learns, logs what it should, validates, and honours the exit flags."""
import io
import os

import pytest

from megatron_alcot.arguments import parse_args
from megatron_alcot.training.train import train

from _tiny import tiny_argv


def test_loop_lowers_loss_and_logs(tmp_path):
    out = io.StringIO()
    tb = tmp_path / "tb"
    history = train(parse_args(tiny_argv(train_iters=8, quiet=False, log_interval=4, eval_interval=4,
                              eval_iters=1, tensorboard_dir=str(tb), peak_flops=1.0,
                              recompute_granularity="full")), stream=out)
    losses = [s["loss"] for s in history.iterations]
    assert losses[-1] < losses[0] - 0.3
    text = out.getvalue()
    for needle in ("iter 4/8", "samples 32", "lm ", "lat ", "lr ", "gnorm", "tok/s", "TFLOP/s",
                   "MFU", "steps ", "skipped 0", "mem ", "validation at iter 4", "ppl"):
        assert needle in text, needle
    assert [e["iteration"] for e in history.evals] == [4, 8]
    assert history.evals[-1]["lm_loss"] < history.evals[0]["lm_loss"]
    assert 0.0 <= history.evals[-1]["mean_latent_steps"] <= 2.0
    assert sum(history.evals[-1]["depth_share"]) == pytest.approx(1.0)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb))
    assert history.consumed_samples == 64 and history.exit_reason == "finished"


def test_bf16_vanilla_and_exit_interval():
    history = train(parse_args(tiny_argv(train_iters=6, bf16=None, latent_method="vanilla", exit_interval=3,
                              save=False)))
    assert history.exit_reason == "interval" and history.iteration == 3
    assert all(s["mean_latent_steps"] == 0.0 for s in history.iterations)
    assert history.iterations[-1]["loss"] < history.iterations[0]["loss"]


def test_fp16_dynamic_loss_scale_runs():
    history = train(parse_args(tiny_argv(train_iters=3, fp16=None, initial_loss_scale=2 ** 40)))
    # the huge initial scale overflows first; the scaler backs off and training proceeds
    assert history.iterations[0]["loss_scale"] <= 2 ** 40
    assert not any(s["nan_skip"] for s in history.iterations)
