"""The one local Slurm cluster of a test session (munged, slurmctld, slurmd on 127.0.0.1).

Tests marked ``system`` must run in CI: when the cluster cannot start, the ``slurm`` fixture fails
with the reason instead of skipping. Deselect them explicitly where no Slurm can run
(``pytest -m "not system"``).
"""
import pytest

from system_setup import LocalSlurm, Unavailable


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
    except Unavailable as exc:
        cluster.stop()
        pytest.fail(f"the local Slurm cluster did not start, so the Slurm tests cannot run: {exc}\n"
                    "They need root and slurm-wlm (installed with apt-get when missing). Run "
                    "pytest -m 'not system' to leave them out on purpose.", pytrace=False)
    yield cluster
    cluster.stop()
