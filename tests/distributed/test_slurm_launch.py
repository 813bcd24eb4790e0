"""Real Slurm: ``sbatch`` a 2-task job whose ``srun python pretrain_alcot.py`` tasks find their
ranks in SLURM_PROCID / SLURM_NTASKS / SLURM_JOB_NODELIST; the DP=2 loss curve equals the
in-process single-process curve. Also checks the command that ``slurm/pretrain_7b.sh`` builds.

The cluster (munged, slurmctld, slurmd on 127.0.0.1, config under a temp dir via SLURM_CONF) is
started once per session and shut down in the fixture's finalizer.
"""
import json
import os
import shlex
import socket
import stat
import subprocess
import sys

import pytest

from megatron_alcot.arguments import parse_args
from megatron_alcot.parallel.launch import expand_nodelist, slurm_master_port
from system_setup import (PRETRAIN, REPO_ROOT, LocalSlurm, Unavailable, assert_curves_match,
                          clean_env, output_flags, reference_curve, tiny_argv)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
    except Unavailable as exc:
        cluster.stop()
        pytest.skip(f"no local Slurm cluster: {exc}")
    yield cluster
    cluster.stop()


def _job_script(path, out, argv, out_dir, host) -> str:
    lines = ["#!/bin/bash",
             "#SBATCH --job-name=alcot-test --nodes=1 --ntasks=2 --cpus-per-task=1 --time=00:05:00",
             f"#SBATCH --output={out} --chdir={REPO_ROOT}",
             "set -euo pipefail",
             "export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1"]
    try:
        socket.gethostbyname(host)       # launch.py takes the master from SLURM_JOB_NODELIST
    except OSError:
        lines.append("export MASTER_ADDR=127.0.0.1   # the node name does not resolve here")
    cmd = [sys.executable, PRETRAIN, *argv, *output_flags(out_dir)]
    lines.append("srun --kill-on-bad-exit=1 " + " ".join(shlex.quote(c) for c in cmd))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.mark.system
def test_srun_two_tasks_match_single_process(slurm, tmp_path):
    argv = tiny_argv()
    out = str(tmp_path / "job.out")
    script = _job_script(str(tmp_path / "job.sh"), out, argv, str(tmp_path), slurm.host)
    try:
        slurm.sbatch_wait(script)       # raises unless the job ends COMPLETED (exit code 0)
    finally:
        log = open(out).read() if os.path.exists(out) else "(no job output)"
        print(log)                      # shown by pytest when the test fails
    assert_curves_match(log, str(tmp_path), reference_curve(argv))


# --- slurm/pretrain_7b.sh, run with stand-ins for srun and scontrol -------------------------------

_RECORDER = """#!{python}
import json, os, sys
with open({log!r}, "a") as f:
    f.write(json.dumps({{"tool": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                         "env": {{k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT",
                                                              "NCCL_DEBUG", "OMP_NUM_THREADS")}}}}) + "\\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print(os.environ["TEST_HOSTNAMES"].replace(" ", "\\n"))
"""


def test_sbatch_script_builds_the_intended_srun_command(tmp_path):
    bin_dir, log = tmp_path / "bin", str(tmp_path / "calls.jsonl")
    bin_dir.mkdir()
    for tool in ("srun", "scontrol"):
        path = bin_dir / tool
        path.write_text(_RECORDER.format(python=sys.executable, log=log))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
                    SLURM_JOB_NODELIST="gpu[07-10]", SLURM_SUBMIT_DIR=str(tmp_path),
                    TOKENIZER_MODEL=str(tmp_path / "tokenizer.model"),
                    TEST_HOSTNAMES=" ".join(expand_nodelist("gpu[07-10]")))
    run = subprocess.run(["bash", os.path.join(REPO_ROOT, "slurm", "pretrain_7b.sh"),
                          "--train-iters", "10"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    with open(log) as f:
        calls = [json.loads(line) for line in f]
    sruns = [c for c in calls if c["tool"] == "srun"]
    assert len(sruns) == 1, calls
    srun = sruns[0]
    # Same master as every task would derive itself from the Slurm variables.
    assert srun["env"]["MASTER_ADDR"] == "gpu07"
    assert srun["env"]["MASTER_PORT"] == str(slurm_master_port("4242"))
    assert srun["env"]["NCCL_DEBUG"]
    # One python per task (no torchrun inside srun), running the entry point with parseable flags.
    script_at = srun["argv"].index("pretrain_alcot.py")
    assert all(a.startswith("-") for a in srun["argv"][:script_at - 1]), srun["argv"]
    args = parse_args(srun["argv"][script_at + 1:])
    assert args.train.train_iters == 10                 # extra sbatch arguments reach the trainer
    assert args.train.exit_signal_handler and args.train.load == args.train.save
    par = args.parallel
    world = 4 * 8                                        # --nodes=4 × --ntasks-per-node=8
    par.validate(world)
    assert args.train.global_batch_size % (args.train.micro_batch_size
                                           * par.data_parallel_size(world)) == 0
    # Not finished (no checkpoint): the script requeues its own job.
    assert any(c["tool"] == "scontrol" and c["argv"][:1] == ["requeue"] for c in calls), calls
