"""Rank discovery from launcher environments (no real Slurm or MPI needed) and the device helper."""
import pytest
import torch

from megatron_alcot.parallel import device
from megatron_alcot.parallel.launch import (LaunchError, discover, expand_nodelist, init_distributed,
                                            resolve_backend, slurm_master_port)


@pytest.mark.parametrize("nodelist,hosts", [
    ("node01", ["node01"]),
    ("node[01-03,7]", ["node01", "node02", "node03", "node7"]),
    ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),
    ("a[1-2],b,c[5]", ["a1", "a2", "b", "c5"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("node-[001-002]x", ["node-001x", "node-002x"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-2", "node1-2]", "node[a-b]"])
def test_expand_nodelist_errors(bad):
    with pytest.raises(LaunchError):
        expand_nodelist(bad)


SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
         "SLURM_JOB_NODELIST": "gpu[12-13,20]", "SLURM_JOB_ID": "123456"}


def test_slurm():
    info = discover(SLURM)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (5, 8, 1, "slurm")
    assert info.master_addr == "gpu12"
    assert info.master_port == slurm_master_port("123456") == 20000 + 123456 % 20000
    info = discover({**SLURM, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"})
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 6000)
    info = discover({k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"} | {"SLURM_NODELIST": "x[3-4]"})
    assert info.master_addr == "x3"


def test_torchrun_wins_over_slurm_and_mpi():
    env = {**SLURM, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "RANK": "3",
           "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    info = discover(env)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (3, 4, 3, "torchrun")
    assert (info.master_addr, info.master_port) == ("h", 1234)
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    assert discover(env).launcher == "mpi"      # mpirun's ranks inherit its daemons' srun step


def test_open_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    info = discover(env)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (1, 2, 1, "mpi")
    assert info.master_addr == "127.0.0.1"
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        discover({**env, "OMPI_COMM_WORLD_SIZE": "4"})
    assert discover({**env, "OMPI_COMM_WORLD_SIZE": "4", "MASTER_ADDR": "n0"}).master_addr == "n0"


def test_single_process_initialises_nothing():
    info = init_distributed(env={})
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (0, 1, 0, "single")
    assert not torch.distributed.is_initialized()


def test_bad_values_are_clear_errors():
    with pytest.raises(LaunchError, match="RANK"):
        discover({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="gloo"):
        resolve_backend("mpi")


def test_device_helper_on_this_machine(monkeypatch):
    monkeypatch.setenv("MEGATRON_ALCOT_DEVICE", "cpu")
    assert device.get_device() == torch.device("cpu")
    assert resolve_backend("auto") == "gloo"
    assert device.to_device(torch.ones(2)).device.type == "cpu"
    state = device.new_rng_state(3)
    device.set_rng_state(state)
    a = torch.rand(2)
    assert torch.equal(a, torch.rand(2, generator=torch.Generator().manual_seed(3)))


def _slurm_task(rank, port, queue):
    import os
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    os.environ.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_STEP_ID="0",
                      SLURM_JOB_NODELIST="127.0.0.[1]", SLURM_JOB_ID=str(port - 20000),
                      MEGATRON_ALCOT_DEVICE="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist
    try:
        info = init_distributed(backend="auto", timeout_minutes=1)
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)
        queue.put((rank, info.launcher, info.backend, info.master_addr, t.item()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port_in_slurm_range():
    import random
    import socket
    for port in random.sample(range(20000, 40000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip("no free port in [20000, 40000)")


@pytest.mark.slow
def test_init_distributed_from_slurm_env_starts_a_gloo_world():
    import torch.multiprocessing as mp
    port = _free_port_in_slurm_range()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_slurm_task, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == [(0, "slurm", "gloo", "127.0.0.1", 3.0), (1, "slurm", "gloo", "127.0.0.1", 3.0)]
