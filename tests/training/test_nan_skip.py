"""A NaN/Inf loss skips the update, is logged, and too many in a row stop the run with exit code 3."""
import io
import os

import torch

from megatron_alcot.arguments import parse_args
from megatron_alcot.training.train import train

import pretrain_alcot
from _tiny import tiny_argv

MICRO_PER_ITER = 4     # global batch 8 / micro-batch 2


def _poison(iterations):
    """on_model_built hook: NaN embeddings during the given (1-based) iterations."""
    calls = {"n": 0}

    def hook(model):
        def forward_hook(module, inputs, output):
            iteration = calls["n"] // MICRO_PER_ITER + 1
            calls["n"] += 1
            return output * float("nan") if iteration in iterations else output
        model.embedding.register_forward_hook(forward_hook)
    return hook


def test_nan_iteration_is_skipped_and_logged():
    snapshots = []

    def hook(model):
        _poison({3})(model)
        snapshots.append(model)

    out = io.StringIO()
    history = train(parse_args(tiny_argv(train_iters=5, quiet=False, max_nan_skips=2)), on_model_built=hook,
                    stream=out)
    steps = history.iterations
    assert [s["nan_skip"] for s in steps] == [False, False, True, False, False]
    assert [s["updated"] for s in steps] == [True, True, False, True, True]
    # the schedule does not advance on a skipped step: iteration 4 uses iteration 3's LR
    assert steps[3]["lr"] == steps[2]["lr"] and steps[2]["lr"] != steps[1]["lr"]
    assert "iteration 3: NaN/Inf loss" in out.getvalue() and "skipped 1" in out.getvalue()
    assert all(torch.isfinite(p).all() for p in snapshots[0].parameters())
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_consecutive_nans_stop_with_exit_code_3(tmp_path, capsys):
    from megatron_alcot.checkpointing import checkpoint as ckpt
    extra = {"save": str(tmp_path / "ckpt"), "save_interval": 1}
    code = pretrain_alcot.main(tiny_argv(train_iters=10, max_nan_skips=3, **extra),
                               on_model_built=_poison(set(range(3, 100))))
    assert code == 3
    err = capsys.readouterr().err
    assert "--max-nan-skips 3" in err and "Traceback" not in err
    # the last good checkpoint (iteration 2) is the latest, nothing after it
    assert ckpt.latest_iteration(str(tmp_path / "ckpt")) == 2
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["iter_0000001", "iter_0000002",
                                                     "latest_checkpointed_iteration.txt"]
