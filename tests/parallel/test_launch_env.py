"""Launcher rules that real clusters exposed: an sbatch shell outside srun, MPICH / Intel MPI (PMI),
MPI launchers under Slurm, and ``world_size_from_env`` following the same rules."""
import os
import subprocess
import sys

import pytest

from megatron_alcot.arguments import parse_args, world_size_from_env
from megatron_alcot.parallel.launch import LaunchError, discover

BATCH_SHELL = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "77",
               "SLURM_JOB_NODELIST": "n[1-2]"}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sbatch_shell_outside_srun_is_an_error_not_a_hang():
    with pytest.raises(LaunchError, match="srun"):
        discover(BATCH_SHELL)
    assert discover({**BATCH_SHELL, "SLURM_NTASKS": "1"}).launcher == "single"
    for step in ({"SLURM_STEP_ID": "0"}, {"SLURM_STEP_NUM_TASKS": "2"}):
        info = discover({**BATCH_SHELL, **step})
        assert (info.launcher, info.rank, info.world_size, info.master_addr) == ("slurm", 0, 2, "n1")


def test_world_size_from_env_follows_the_same_rules(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "OMPI_", "PMI_", "MPI_LOCAL")) or key in ("RANK", "WORLD_SIZE"):
            monkeypatch.delenv(key)
    assert world_size_from_env() == 1
    for key, value in BATCH_SHELL.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(LaunchError, match="srun"):
        world_size_from_env()
    from pretrain_alcot import EXIT_CONFIG, main        # a clear message and exit 2, no traceback
    assert main(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                 "--micro-batch-size", "1", "--train-iters", "1", "--mock-data",
                 "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"]) == EXIT_CONFIG
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert world_size_from_env() == 2
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "2")     # srun --mpi=pmi2 sets the same numbers
    assert world_size_from_env() == 2


def test_mpich_and_intel_mpi():
    env = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}
    info = discover(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("pmi", 3, 4, 1)
    assert (info.master_addr, info.master_port) == ("127.0.0.1", 29500)
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        discover({**env, "MPI_LOCALNRANKS": "2"})
    info = discover({**env, "MPI_LOCALNRANKS": "2", "MASTER_ADDR": "n0", "MASTER_PORT": "6000"})
    assert (info.master_addr, info.master_port) == ("n0", 6000)


def test_mpi_launchers_under_slurm():
    # Hydra started one proxy per node with srun: the step has 2 tasks, PMI_SIZE is 8.
    hydra = {**BATCH_SHELL, "SLURM_STEP_ID": "0", "PMI_RANK": "5", "PMI_SIZE": "8",
             "MPI_LOCALRANKID": "1", "MASTER_ADDR": "n1"}
    assert (discover(hydra).launcher, discover(hydra).rank) == ("pmi", 5)
    # srun --mpi=pmi2: PMI numbers equal the step's, and the Slurm rule derives the master.
    pmi2 = {**BATCH_SHELL, "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "PMI_RANK": "1", "PMI_SIZE": "2"}
    info = discover(pmi2)
    assert (info.launcher, info.rank, info.master_addr) == ("slurm", 1, "n1")
    # Open MPI's mpirun in a batch shell (no srun step of our own).
    ompi = {**BATCH_SHELL, "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}
    assert discover(ompi).launcher == "mpi"


def _script(env, *args):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TOKENIZER_"))}
    clean["PYTHON"] = sys.executable       # the dry run's memory plan imports torch
    return subprocess.run(["bash", os.path.join(REPO, "slurm", "pretrain_7b.sh"), *args],
                          env={**clean, **env}, capture_output=True, text=True, timeout=120)


def test_sbatch_script_dry_run_and_tokenizer_check():
    run = _script({"DRY_RUN": "1", "TOKENIZER_MODEL": "/models/llama-2/tokenizer.model"},
                  "--train-iters", "10")
    assert run.returncode == 0, run.stderr
    argv = next(l for l in run.stdout.splitlines() if l.startswith("srun ")).split()
    assert argv[:4] == ["srun", "--kill-on-bad-exit=1", "--cpu-bind=none", "--cpus-per-task=12"]
    args = parse_args(argv[argv.index("pretrain_alcot.py") + 1:])
    assert args.train.train_iters == 10
    assert (args.data.tokenizer_type, args.data.tokenizer_model) == \
        ("Llama2Tokenizer", "/models/llama-2/tokenizer.model")
    missing = _script({"DRY_RUN": "1"})
    assert missing.returncode == 2 and "TOKENIZER_MODEL" in missing.stderr
    outside = _script({"TOKENIZER_MODEL": "t.model"})
    assert outside.returncode == 2 and "sbatch" in outside.stderr
