"""``mpirun -np 2 python pretrain_alcot.py``: ranks come from OMPI_COMM_WORLD_*, the master from
``-x MASTER_ADDR -x MASTER_PORT``; the DP=2 loss curve equals the in-process single-process curve."""
import subprocess
import sys

import pytest

from system_setup import (PRETRAIN, REPO_ROOT, Unavailable, assert_curves_match, clean_env,
                          free_port, open_mpi_command, output_flags, reference_curve, tiny_argv)

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def mpirun():
    try:
        return open_mpi_command(np=2)
    except Unavailable as exc:
        pytest.skip(f"Open MPI unavailable: {exc}")


def test_mpirun_two_ranks_match_single_process(mpirun, tmp_path):
    argv = tiny_argv()
    port = free_port()
    # The children see only what -x exports (plus the local environment Open MPI forwards).
    exports = ["-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={port}", "-x", "OMP_NUM_THREADS=1",
               "-x", "PYTHONUNBUFFERED=1", "-x", "PATH"]
    cmd = mpirun + exports + [sys.executable, PRETRAIN, *argv, *output_flags(str(tmp_path))]
    run = subprocess.run(cmd, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, f"mpirun failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"
    assert_curves_match(run.stdout, str(tmp_path), reference_curve(argv))
