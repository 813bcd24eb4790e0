"""Real Slurm: ``sbatch`` a 2-task job whose ``srun python pretrain_alcot.py`` tasks find their
ranks in SLURM_PROCID / SLURM_NTASKS / SLURM_JOB_NODELIST; the DP=2 loss curve equals the
in-process single-process curve. Also checks the command that ``slurm/pretrain_7b.sh`` builds.

The cluster (munged, slurmctld, slurmd on 127.0.0.1, config under a temp dir via SLURM_CONF) is
the session fixture ``slurm`` of conftest.py: started once, shut down at the end, and a failure
(not a skip) when it cannot start.
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
from system_setup import (PRETRAIN, REPO_ROOT, assert_curves_match,
                          clean_env, output_flags, reference_curve, tiny_argv)


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


# --- slurm/pretrain_7b.sh, run with stand-ins for srun, scontrol and squeue ----------------------

_RECORDER = """#!{python}
import json, os, sys
tool, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps({{"tool": tool, "argv": argv,
                         "env": {{k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT",
                                                              "NCCL_DEBUG", "OMP_NUM_THREADS")}}}}) + "\\n")
if argv[0:2] == ["show", "hostnames"]:
    print(os.environ["TEST_HOSTNAMES"].replace(" ", "\\n"))
if argv[0:2] == ["show", "job"]:
    print("   StdOut=" + os.environ["TEST_STDOUT"])
if tool == "squeue" and os.environ.get("TEST_END_IN_S"):     # the job's end time, as %e prints it
    import datetime
    end = datetime.datetime.now() + datetime.timedelta(seconds=int(os.environ["TEST_END_IN_S"]))
    print(end.strftime("%Y-%m-%dT%H:%M:%S"))
if tool == "srun" and os.environ.get("TEST_END_IN_S"):       # run until the lead timer signals us (~2 s)
    import time
    for _ in range(200):
        with open({log!r}) as f:
            if '"scancel"' in f.read():
                break
        time.sleep(0.1)
if tool == "srun":                       # the training's ending, as pretrain_alcot.py records it
    save = argv[len(argv) - 1 - argv[::-1].index("--save") + 1]
    if os.environ.get("TEST_EXIT_REASON"):
        os.makedirs(save, exist_ok=True)
        with open(os.path.join(save, "last_exit.json"), "w") as f:
            json.dump({{"reason": os.environ["TEST_EXIT_REASON"], "iteration": 7}}, f)
        with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("7")
    sys.exit(int(os.environ.get("TEST_SRUN_RC", "0")))
"""


def _run_script(tmp_path, reason, srun_rc, stale_record=False, **extra_env):
    bin_dir, log = tmp_path / "bin", str(tmp_path / "calls.jsonl")
    bin_dir.mkdir()
    for tool in ("srun", "scontrol", "squeue", "scancel"):
        path = bin_dir / tool
        path.write_text(_RECORDER.format(python=sys.executable, log=log))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    stdout = tmp_path / "job.out"
    stdout.write_text("iter 3/10 | ...\nRuntimeError: CUDA out of memory on rank 5\nsrun: error: task 5: Exited\n")
    ckpt = tmp_path / "ckpt"
    if stale_record:                      # left by an earlier, cleanly pre-empted run
        ckpt.mkdir()
        (ckpt / "last_exit.json").write_text('{"reason": "signal", "iteration": 3}')
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
                    SLURM_JOB_NODELIST="gpu[07-10]", SLURM_SUBMIT_DIR=REPO_ROOT, SLURM_NTASKS="32",
                    SLURM_CPUS_PER_TASK="12", TOKENIZER_MODEL=str(tmp_path / "tokenizer.model"),
                    CKPT_DIR=str(tmp_path / "unused"), PYTHON=sys.executable,
                    TEST_HOSTNAMES=" ".join(expand_nodelist("gpu[07-10]")), TEST_STDOUT=str(stdout),
                    TEST_EXIT_REASON=reason or "", TEST_SRUN_RC=str(srun_rc), **extra_env)
    run = subprocess.run(["bash", os.path.join(REPO_ROOT, "slurm", "pretrain_7b.sh"),
                          "--train-iters", "10", "--save", str(ckpt)], env=env,
                         capture_output=True, text=True, timeout=60)
    with open(log) as f:
        calls = [json.loads(line) for line in f]
    requeued = any(c["tool"] == "scontrol" and c["argv"][:1] == ["requeue"] for c in calls)
    return run, calls, requeued


def test_sbatch_script_builds_the_intended_srun_command(tmp_path):
    run, calls, requeued = _run_script(tmp_path, "signal", 0)
    assert run.returncode == 0, run.stdout + run.stderr
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
    assert "--cpus-per-task=12" in srun["argv"][:script_at]
    args = parse_args(srun["argv"][script_at + 1:])
    assert args.train.train_iters == 10                 # extra sbatch arguments reach the trainer
    assert args.train.save == args.train.load or args.train.save == str(tmp_path / "ckpt")
    assert args.train.exit_signal_handler and args.train.exit_signal == "SIGTERM"
    assert args.train.keep_last_checkpoints == 3 and args.data.num_workers == 2
    par = args.parallel
    assert par.use_distributed_optimizer and par.zero_stage == 1
    world = 4 * 8                                        # --nodes=4 × --ntasks-per-node=8
    par.validate(world)
    assert args.train.global_batch_size % (args.train.micro_batch_size
                                           * par.data_parallel_size(world)) == 0
    # A clean pre-emption (last_exit.json says signal, srun exited 0): the job requeues itself.
    assert requeued, calls
    assert "requeueing job 4242" in run.stdout


@pytest.mark.parametrize("reason, srun_rc, stale", [("finished", 0, False), (None, 1, False),
                                                    (None, 137, True), (None, 0, False)])
def test_sbatch_script_requeues_only_after_a_clean_stop(tmp_path, reason, srun_rc, stale):
    run, calls, requeued = _run_script(tmp_path, reason, srun_rc, stale_record=stale)
    assert not requeued, calls
    if reason == "finished":
        assert run.returncode == 0 and "not requeueing" in run.stdout, run.stdout + run.stderr
        return
    # A crash (or an exit without a record, or only a stale one): the job fails and says why.
    assert run.returncode == (srun_rc or 1), run.stdout + run.stderr
    assert f"srun exited with status {srun_rc}" in run.stderr
    assert "RuntimeError: CUDA out of memory on rank 5" in run.stderr, run.stderr


def test_dry_run_prints_the_srun_line_for_every_recipe():
    for name in ("pretrain_410m.sh", "pretrain_1.4b.sh", "pretrain_7b.sh"):
        env = clean_env(DRY_RUN="1", TOKENIZER_MODEL="tokenizer.model", PYTHON=sys.executable)
        run = subprocess.run(["bash", os.path.join(REPO_ROOT, "slurm", name), "--train-iters", "7"],
                             env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
        assert run.returncode == 0, run.stdout + run.stderr
        line = next(l for l in run.stdout.splitlines() if l.startswith("srun "))
        argv = shlex.split(line)
        args = parse_args(argv[argv.index("pretrain_alcot.py") + 1:])
        assert args.train.train_iters == 7 and args.train.exit_signal_handler


def test_signal_lead_timer_signals_the_step_not_the_batch_shell(tmp_path):
    """SIGNAL_LEAD_S before the end time squeue reports, the script sends SIGTERM to the job's
    steps (``scancel --signal=TERM <job>``, no --full / --batch: srun would kill the step on it)."""
    run, calls, requeued = _run_script(tmp_path, "signal", 0, TEST_END_IN_S="302", SIGNAL_LEAD_S="300")
    assert run.returncode == 0 and requeued, run.stdout + run.stderr
    scancels = [c["argv"] for c in calls if c["tool"] == "scancel"]
    assert scancels == [["--signal=TERM", "4242"]], calls
    assert "300 s before the time limit: SIGTERM to the training tasks" in run.stdout
