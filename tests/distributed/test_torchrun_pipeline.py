"""``torchrun --nproc-per-node 4 pretrain_alcot.py --pipeline-model-parallel-size 2
--use-distributed-optimizer --zero-stage 2`` with tied embeddings (PP = 2 x DP = 2, 1F1B lap
schedule, ZeRO-2): the loss curve equals the single-process curve at the same global batch."""
import os
import re
import subprocess

import pytest

from system_setup import (PRETRAIN, REPO_ROOT, clean_env, output_flags, parse_log, read_metrics,
                          reference_curve, tiny_argv)
from test_torchrun_launch import torchrun_command

pytestmark = pytest.mark.slow


def test_torchrun_pp2_dp2_zero2_tied_matches_single_process(tmp_path):
    argv = tiny_argv(train_iters=3)            # embeddings tied (the default)
    parallel = ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--zero-stage", "2"]
    cmd = torchrun_command() + ["--standalone", "--nproc-per-node", "4", PRETRAIN, *argv, *parallel,
                                *output_flags(str(tmp_path))]
    run = subprocess.run(cmd, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True,
                         timeout=420)
    assert run.returncode == 0, f"torchrun failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"
    headers = re.findall(r"^training \d+ iterations .*$", run.stdout, flags=re.M)
    assert len(headers) == 1 and "dp 2), world 4," in headers[0] and "pp 2" in headers[0], headers

    reference = reference_curve(argv)
    printed = parse_log(run.stdout)
    assert [s["iteration"] for s in printed] == list(range(1, len(reference) + 1)), run.stdout
    for got, ref in zip(printed, reference):
        for key, tol in (("loss", 1e-4), ("lm_loss", 1e-4), ("latent_loss", 1e-4),
                         ("grad_norm", 1e-3), ("mean_latent_steps", 1e-2)):
            assert got[key] == pytest.approx(ref[key], abs=tol), (key, got, ref)
    precise = read_metrics(os.path.join(str(tmp_path), "metrics.jsonl"))
    for got, ref in zip(precise, reference):
        for key in ("loss", "lm_loss", "latent_loss", "grad_norm", "mean_latent_steps", "lr"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (key, got, ref)
