"""A save interrupted at any point leaves the previous checkpoint and the latest pointer intact."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_alcot.checkpointing import (atomic, latest_iteration, list_iterations,
                                          load_checkpoint, save_checkpoint)
from megatron_alcot.parallel.tensor_parallel.random import model_parallel_seed
from standin import StandIn, config_dict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))


def _model(seed):
    model_parallel_seed(seed)
    return StandIn()


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_crash_before_rename_keeps_previous(tmp_path, monkeypatch):
    d = str(tmp_path)
    first = _model(1)
    save_checkpoint(d, 1, first, consumed_samples=1, config_dict=config_dict())

    def crash(*_):
        raise RuntimeError("simulated crash between the tmp write and the rename")

    monkeypatch.setattr(atomic, "commit_directory", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(d, 2, _model(2), consumed_samples=2, config_dict=config_dict())
    monkeypatch.undo()
    assert os.path.isdir(tmp_path / "iter_0000002.tmp")
    assert latest_iteration(d) == 1 and list_iterations(d) == [1]
    loaded = _model(3)
    assert load_checkpoint(d, loaded)["iteration"] == 1 and _same(loaded, first)
    # The next save removes the leftover and moves the pointer.
    save_checkpoint(d, 2, _model(2), consumed_samples=2, config_dict=config_dict())
    assert sorted(os.listdir(d)) == ["iter_0000001", "iter_0000002",
                                     "latest_checkpointed_iteration.txt"]
    assert latest_iteration(d) == 2


def test_crash_before_pointer_moves(tmp_path, monkeypatch):
    d = str(tmp_path)
    first = _model(1)
    save_checkpoint(d, 1, first, consumed_samples=1, config_dict=config_dict())
    monkeypatch.setattr(atomic, "replace_text", lambda *_: (_ for _ in ()).throw(OSError("disk full")))
    second = _model(2)
    with pytest.raises(OSError):
        save_checkpoint(d, 2, second, consumed_samples=2, config_dict=config_dict())
    monkeypatch.undo()
    assert latest_iteration(d) == 1          # the pointer still names the previous checkpoint
    loaded = _model(3)
    assert load_checkpoint(d, loaded)["iteration"] == 1 and _same(loaded, first)
    assert load_checkpoint(d, loaded, iteration=2)["iteration"] == 2 and _same(loaded, second)


def test_resave_same_iteration_replaces_it(tmp_path):
    d = str(tmp_path)
    save_checkpoint(d, 5, _model(1), consumed_samples=1, config_dict=config_dict())
    newer = _model(2)
    save_checkpoint(d, 5, newer, consumed_samples=1, config_dict=config_dict())
    loaded = _model(3)
    load_checkpoint(d, loaded)
    assert _same(loaded, newer) and sorted(os.listdir(d))[0] == "iter_0000005"


_KILLED_SAVER = textwrap.dedent("""
    import os, sys, time
    sys.path[:0] = [{here!r}, {repo!r}]
    import torch
    from megatron_alcot.checkpointing import atomic, save_checkpoint
    from megatron_alcot.parallel.tensor_parallel.random import model_parallel_seed
    from standin import StandIn, config_dict
    d = sys.argv[1]
    model_parallel_seed(1)
    model = StandIn(hidden=256, ffn=2048, num_layers=4)   # ~40 MB of fp32 weights
    cfg = config_dict(hidden=256, ffn=2048, num_layers=4)
    save_checkpoint(d, 1, model, consumed_samples=1, config_dict=cfg)
    real = atomic.write_file_synced

    def slow(path, write):
        size = real(path, write)
        with open(path, "r+b") as f:          # cut the file: the kill lands mid-write
            f.truncate(size // 2)
        print("WRITING", path, flush=True)
        time.sleep(120)

    atomic.write_file_synced = slow
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_checkpoint(d, 2, model, consumed_samples=2, config_dict=cfg)
""")


def test_sigkill_during_large_save(tmp_path):
    d = str(tmp_path / "ckpt")
    script = tmp_path / "saver.py"
    script.write_text(_KILLED_SAVER.format(here=HERE, repo=REPO))
    proc = subprocess.Popen([sys.executable, str(script), d], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("WRITING"), line
        assert ".tmp" in line
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert latest_iteration(d) == 1 and list_iterations(d) == [1]
    assert os.path.isdir(os.path.join(d, "iter_0000002.tmp"))
    model_parallel_seed(1)
    expected = StandIn(hidden=256, ffn=2048, num_layers=4)
    loaded = StandIn(hidden=256, ffn=2048, num_layers=4)
    with torch.no_grad():
        for p in loaded.parameters():
            p.zero_()
    info = load_checkpoint(d, loaded)
    assert info["iteration"] == 1 and _same(loaded, expected)
