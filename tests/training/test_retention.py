"""--keep-last-checkpoints: the newest N complete checkpoints stay, the latest always, a save in
progress is never touched, and the kept ones still load to the same weights."""
import os

import pytest
import torch

from _tiny import tiny_argv
from megatron_alcot.checkpointing import latest_iteration, list_iterations
from megatron_alcot.checkpointing.metadata import LATEST_FILE, iteration_dir
from megatron_alcot.checkpointing.retention import prune_checkpoints


def _fake_checkpoint(root, iteration):
    path = iteration_dir(str(root), iteration)
    os.makedirs(path)
    with open(os.path.join(path, "metadata.json"), "w") as f:
        f.write("{}")


def test_keeps_newest_complete_and_latest_and_ignores_saves_in_progress(tmp_path):
    for it in (10, 20, 30, 40):
        _fake_checkpoint(tmp_path, it)
    os.makedirs(iteration_dir(str(tmp_path), 50) + ".tmp")          # a save being written
    (tmp_path / LATEST_FILE).write_text("20")                        # e.g. resumed from 20
    assert prune_checkpoints(str(tmp_path), keep_last=1) == [10, 30]
    assert list_iterations(str(tmp_path)) == [20, 40]
    assert os.path.isdir(iteration_dir(str(tmp_path), 50) + ".tmp")
    assert not [n for n in os.listdir(tmp_path) if "deleting" in n]
    with pytest.raises(ValueError, match="--keep-last-checkpoints"):
        prune_checkpoints(str(tmp_path), keep_last=0)


def test_training_keeps_the_last_two_and_they_load(tmp_path):
    from megatron_alcot.checkpointing import load_full_state_dict
    from megatron_alcot.arguments import parse_args
    from megatron_alcot.training.train import train
    save = str(tmp_path / "ckpt")
    train(parse_args(tiny_argv(train_iters=5, save=save, save_interval=1, keep_last_checkpoints=2)))
    assert list_iterations(save) == [4, 5] and latest_iteration(save) == 5
    state, meta = load_full_state_dict(save, 4)
    assert meta["iteration"] == 4 and all(torch.isfinite(t).all() for t in state.values())


def test_flag_needs_save_and_a_positive_count():
    from megatron_alcot.arguments import parse_args, validate_args
    from megatron_alcot.config import ConfigError
    for extra, message in (({"keep_last_checkpoints": 0, "save": "x"}, "must be >= 1"),
                           ({"keep_last_checkpoints": 2}, "needs --save")):
        args = parse_args(tiny_argv(**extra))
        with pytest.raises(ConfigError, match=message):
            validate_args(args, 1)
