"""``torchrun --standalone --nproc-per-node 2 pretrain_alcot.py``: the DP=2 loss curve equals the
in-process single-process curve at the same global batch."""
import os
import subprocess
import sys

import pytest

from system_setup import (PRETRAIN, REPO_ROOT, assert_curves_match, clean_env, output_flags,
                          reference_curve, tiny_argv)

pytestmark = pytest.mark.slow


def torchrun_command():
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "torch.distributed.run"]


def test_torchrun_two_ranks_match_single_process(tmp_path):
    argv = tiny_argv()
    cmd = torchrun_command() + ["--standalone", "--nproc-per-node", "2", PRETRAIN, *argv,
                                *output_flags(str(tmp_path))]
    run = subprocess.run(cmd, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, f"torchrun failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"
    assert_curves_match(run.stdout, str(tmp_path), reference_curve(argv))
