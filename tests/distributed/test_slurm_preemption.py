"""The cluster path on a real (local) Slurm: ``sbatch slurm/pretrain_7b.sh`` from a fresh copy of
the repository, tiny-model flags appended (the last value wins), 2 tasks, 2 DataLoader workers each.

1. Pre-empted with ``scancel --signal=TERM`` (what the script's SIGNAL_LEAD_S timer sends before the
   time limit: every process of the step, workers included): the tasks save, the script requeues the
   job, the requeued run resumes, and its losses equal an uninterrupted run's bit for bit.
2. SIGKILL while a checkpoint is being written: the job fails (not requeued) with the reason, and
   the previous checkpoint is the latest and loads.
3. No signal from outside: the script's own timer signals the step SIGNAL_LEAD_S before the job's
   time limit (read from squeue), and the job saves and is requeued.
"""
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from dist_utils import run_distributed
from system_setup import REPO_ROOT, clean_env

pytestmark = [pytest.mark.system, pytest.mark.slow]

TINY = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176",
        "--num-attention-heads", "4", "--seq-length", "32", "--max-position-embeddings", "32",
        "--tensor-model-parallel-size", "1", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--lr", "3e-3", "--lr-warmup-fraction", "0.05", "--min-lr", "3e-4", "--clip-grad", "0.5",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
        "--make-vocab-size-divisible-by", "64", "--eval-iters", "0", "--latent-max-steps", "2",
        "--seed", "7", "--log-interval", "1", "--distributed-backend", "gloo",
        "--distributed-timeout-minutes", "3", "--peak-flops", "1", "--num-workers", "2"]
SBATCH = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]


def _fresh_copy(dst) -> str:
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "*_out", "*.out",
                                    "checkpoints", "tensorboard", "logs")
    shutil.copytree(REPO_ROOT, dst, ignore=ignore)
    return str(dst)


def _job_env(slurm, ckpt, **extra):
    env = clean_env(**{"SLURM_CONF": slurm.conf, "PYTHON": sys.executable, "DATA_PATH": "mock",
                       "TOKENIZER_MODEL": "unused", "CKPT_DIR": ckpt, **extra})
    try:
        socket.gethostbyname(slurm.host)     # launch.py takes the master from SLURM_JOB_NODELIST
    except OSError:
        env["MASTER_ADDR"] = "127.0.0.1"
    return env


def _submit(slurm, repo, env, flags, minutes=10) -> int:
    out = subprocess.run(["sbatch", "--parsable", *SBATCH, f"--time={minutes}", "slurm/pretrain_7b.sh", *flags],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return int(out.stdout.strip().split(";")[0])


def _log(repo, job) -> str:
    path = os.path.join(repo, f"alcot-7b-{job}.out")
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def _wait(what, predicate, timeout, slurm, repo, job):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    subprocess.run(["scancel", str(job)], env=slurm.env, capture_output=True)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; job {job} is "
                         f"{slurm.job_state(job)}\n{_log(repo, job)}\n{slurm.logs()}")


def _train_records(repo) -> dict:
    """iteration -> the last full-precision record of it in the run's --metrics-file."""
    records = {}
    with open(os.path.join(repo, "alcot_7b-metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["kind"] == "train":
                records[row["iteration"]] = row
    return records


def _uninterrupted(rank, world, argv):
    import torch
    from megatron_alcot.arguments import parse_args
    from megatron_alcot.training.train import train
    os.environ["MEGATRON_ALCOT_DEVICE"] = "cpu"
    torch.set_num_threads(1)
    history = train(parse_args(argv + ["--quiet"]))
    return [(s["iteration"], s["loss"], s["lm_loss"], s["latent_loss"], s["grad_norm"])
            for s in history.iterations]


def _script_argv(repo, env, flags):
    """The pretrain_alcot.py flags the script runs (its DRY_RUN line)."""
    run = subprocess.run(["bash", "slurm/pretrain_7b.sh", *flags], cwd=repo, env=dict(env, DRY_RUN="1"),
                         capture_output=True, text=True, timeout=120)
    line = next(l for l in run.stdout.splitlines() if l.startswith("srun "))
    argv = shlex.split(line)
    return argv[argv.index("pretrain_alcot.py") + 1:]


def test_preempted_job_saves_requeues_and_resumes_bit_for_bit(slurm, tmp_path):
    repo = _fresh_copy(tmp_path / "repo")
    ckpt = str(tmp_path / "ckpt")
    env = _job_env(slurm, ckpt)
    flags = TINY + ["--train-iters", "24", "--save-interval", "1000"]
    job = _submit(slurm, repo, env, flags)
    _wait("iteration 4 in the log", lambda: "iter 4/" in _log(repo, job), 90, slurm, repo, job)
    subprocess.run(["scancel", "--signal=TERM", str(job)], env=slurm.env, check=True)
    _wait("the script to requeue the job",
          lambda: slurm.job_field(job, "Restarts") == "1" and slurm.job_state(job) == "PENDING",
          90, slurm, repo, job)
    # Slurm holds a requeued job for two minutes (BeginTime); start it now instead.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm.env, check=True)
    _wait("the requeued run to finish",
          lambda: slurm.job_field(job, "Restarts") == "1" and slurm.job_state(job) == "COMPLETED",
          90, slurm, repo, job)
    log = _log(repo, job)
    record_line = next(l for l in log.splitlines() if l.startswith("exiting at iteration"))
    stopped = int(record_line.split()[3])
    assert 4 <= stopped < 24 and record_line.endswith(f"(signal); checkpoint saved to {ckpt}"), log
    assert "DataLoader worker" not in log and "Traceback" not in log, log
    assert f"stopped cleanly (signal) at iteration {stopped}; requeueing job {job}" in log, log
    assert f"job {job} (restart 1)" in log, log
    assert f"resumed from {ckpt}/iter_{stopped:07d} at iteration {stopped}" in log, log
    assert "training ended (finished); not requeueing" in log, log
    assert json.load(open(os.path.join(ckpt, "last_exit.json")))["reason"] == "finished"

    # The same command line, never interrupted, in a world of 2 outside Slurm.
    argv = _script_argv(repo, env, flags)
    ref_dir = str(tmp_path / "ref")
    argv += ["--save", ref_dir, "--load", ref_dir, "--metrics-file", os.path.join(ref_dir, "m.jsonl"),
             "--tensorboard-dir", os.path.join(ref_dir, "tb")]
    reference = run_distributed(_uninterrupted, 2, argv)[0]
    got = _train_records(repo)
    assert sorted(got) == list(range(1, 25))
    for iteration, loss, lm, latent, gnorm in reference:
        row = got[iteration]
        assert (row["loss"], row["lm_loss"], row["latent_loss"], row["grad_norm"]) == \
            (loss, lm, latent, gnorm), (iteration, row, (loss, lm, latent, gnorm), stopped)


_SLOW_SAVE = """#!{python}
# pretrain_alcot.py whose write of checkpoint {iteration} never ends (stands for a slow file system).
import os, runpy, sys, time
from megatron_alcot.checkpointing import atomic
write = atomic.write_file_synced
def stuck(path, fn):
    if "iter_{iteration:07d}.tmp" in path:
        open({marker!r}, "w").close()
        time.sleep(600)
    return write(path, fn)
atomic.write_file_synced = stuck
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(slurm, tmp_path):
    repo = _fresh_copy(tmp_path / "repo")
    ckpt, marker = str(tmp_path / "ckpt"), str(tmp_path / "saving")
    python = tmp_path / "slow_save_python"
    python.write_text(_SLOW_SAVE.format(python=sys.executable, iteration=4, marker=marker))
    python.chmod(0o755)
    env = _job_env(slurm, ckpt, PYTHON=str(python), PYTHONPATH=repo)
    job = _submit(slurm, repo, env, TINY + ["--train-iters", "24", "--save-interval", "2"])
    _wait("the save of iteration 4", lambda: os.path.exists(marker), 90, slurm, repo, job)
    # SIGKILL to the training step only (to the whole job it would cancel the batch shell too).
    subprocess.run(["scancel", "--signal=KILL", f"{job}.0"], env=slurm.env, check=True)
    _wait("the job to end", lambda: slurm.job_state(job) not in ("PENDING", "RUNNING", "COMPLETING",
                                                                 "CONFIGURING"), 60, slurm, repo, job)
    log = _log(repo, job)
    assert slurm.job_state(job) == "FAILED" and slurm.job_field(job, "Restarts") == "0", log
    assert "no clean stop was recorded" in log and "not requeueing" in log, log
    assert not os.path.exists(os.path.join(ckpt, "last_exit.json"))
    assert os.path.isdir(os.path.join(ckpt, "iter_0000004.tmp"))      # the interrupted save

    from megatron_alcot.checkpointing import latest_iteration, list_iterations, load_full_state_dict
    assert latest_iteration(ckpt) == 2 and list_iterations(ckpt) == [2]
    state, meta = load_full_state_dict(ckpt)
    assert meta["iteration"] == 2 and state


def test_time_limit_timer_signals_saves_and_requeues(slurm, tmp_path):
    """No scancel from outside: the script reads the job's end time from squeue and SIGTERMs the
    step SIGNAL_LEAD_S before it, the tasks save, and the script requeues the job."""
    repo = _fresh_copy(tmp_path / "repo")
    ckpt = str(tmp_path / "ckpt")
    lead = 120            # a 3-minute limit: the signal ~60 s after the start, well after the tasks are up
    env = _job_env(slurm, ckpt, SIGNAL_LEAD_S=str(lead))
    flags = TINY + ["--train-iters", "100000", "--save-interval", "100000"]
    job = _submit(slurm, repo, env, flags, minutes=3)
    _wait("the script to requeue the job",
          lambda: slurm.job_field(job, "Restarts") == "1" and slurm.job_state(job) == "PENDING",
          150, slurm, repo, job)
    subprocess.run(["scancel", str(job)], env=slurm.env, check=True)
    log = _log(repo, job)
    assert f"{lead} s before the time limit: SIGTERM to the training tasks" in log, log
    record_line = next(l for l in log.splitlines() if l.startswith("exiting at iteration"))
    stopped = int(record_line.split()[3])
    assert stopped >= 1 and record_line.endswith(f"(signal); checkpoint saved to {ckpt}"), log
    assert "DataLoader worker" not in log and "Traceback" not in log, log
    assert f"stopped cleanly (signal) at iteration {stopped}; requeueing job {job}" in log, log
    from megatron_alcot.checkpointing import latest_iteration
    assert latest_iteration(ckpt) == stopped
