"""Rank discovery and ``torch.distributed`` start-up for torchrun, Slurm, Open MPI, MPICH / Intel MPI
or one process.

    from megatron_alcot.parallel.launch import init_distributed, discover
    info = init_distributed(backend="auto", timeout_minutes=10)   # DistInfo(rank, world_size, local_rank)
    discover().world_size                                         # what the launcher announces; starts nothing

Where the ranks come from, first match wins:

1. torchrun / any launcher that sets ``RANK`` and ``WORLD_SIZE`` (+ ``LOCAL_RANK``, ``MASTER_ADDR``,
   ``MASTER_PORT``);
2. Open MPI ``mpirun``: ``OMPI_COMM_WORLD_RANK``/``SIZE``/``LOCAL_RANK``; the master is
   ``MASTER_ADDR``, or 127.0.0.1 when all ranks are on one node;
3. Slurm, inside an ``srun`` step (``SLURM_STEP_ID`` or ``SLURM_STEP_NUM_TASKS`` set):
   ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the master is ``MASTER_ADDR`` or the first
   host of ``SLURM_JOB_NODELIST`` (the compressed ``node[01-03,7]`` syntax is expanded here;
   ``scontrol show hostnames`` is only a fallback), the port is ``MASTER_PORT`` or derived from
   ``SLURM_JOB_ID``;
4. MPICH / Intel MPI (Hydra): ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``; the master as for Open MPI
   (``MPI_LOCALNRANKS`` tells whether all ranks share one node);
5. an ``sbatch`` shell outside ``srun`` (``SLURM_PROCID`` and ``SLURM_NTASKS`` > 1 but no step
   variables): :class:`LaunchError`, start the program with ``srun``;
6. nothing: a single process, ``torch.distributed`` is not initialised.

MPI launchers come before Slurm because under Slurm they start their per-node daemons with ``srun``,
so their ranks inherit that step's ``SLURM_*`` variables (one task per node). Slurm's own PMI plugin
(``srun --mpi=pmi2``) also sets ``PMI_RANK``/``PMI_SIZE``, equal to the Slurm ones: inside a step
whose task count equals ``PMI_SIZE`` the Slurm rule applies.

``backend="auto"`` is nccl when CUDA is available, else gloo.
"""
from __future__ import annotations

import datetime
import itertools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch.distributed as dist

from megatron_alcot.config import ConfigError
from megatron_alcot.parallel import device

DEFAULT_MASTER_PORT = 29500


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str = "single"            # torchrun | slurm | mpi | pmi | single
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    backend: Optional[str] = None       # set by init_distributed when a process group exists


class LaunchError(ConfigError, RuntimeError):
    """The launcher environment is incomplete or inconsistent; the message says what to set.
    A ``ConfigError``, so ``pretrain_alcot.py`` prints it and exits 2 without a traceback."""


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand Slurm's compressed host list.

        >>> expand_nodelist("node[01-03,7],gpu-a[1-2]x")
        ['node01', 'node02', 'node03', 'node7', 'gpu-a1x', 'gpu-a2x']

    Zero padding follows the range start (``[08-10]`` -> 08, 09, 10); several bracket groups in
    one name expand as a product (``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1, r2n2).
    """
    hosts: List[str] = []
    for pattern in _split_top_level(nodelist.strip()):
        parts = re.split(r"(\[[^\]]*\])", pattern)
        choices = []
        for part in parts:
            if part.startswith("["):
                choices.append(_expand_bracket(part[1:-1], pattern))
            elif part:
                choices.append([part])
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def _split_top_level(s: str) -> List[str]:
    out, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"unbalanced ']' in Slurm node list {s!r}")
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise LaunchError(f"unbalanced '[' in Slurm node list {s!r}")
    out.append("".join(cur))
    return [p for p in out if p]


def _expand_bracket(body: str, pattern: str) -> List[str]:
    values = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise LaunchError(f"cannot parse range {item!r} in Slurm node list entry {pattern!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        width = len(lo)
        values.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return values


def _first_slurm_host(env: Mapping[str, str]) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("Slurm launch without SLURM_JOB_NODELIST: set MASTER_ADDR to the "
                          "first node's address")
    try:
        return expand_nodelist(nodelist)[0]
    except LaunchError:
        if shutil.which("scontrol"):
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, check=True).stdout.split()
            if out:
                return out[0]
        raise


def slurm_master_port(job_id: str) -> int:
    """A port in [20000, 40000) that is the same on every task of a job and differs between jobs."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits[-9:]) % 20000


def _int_env(env, name) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    return "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEP_NUM_TASKS" in env)


def _slurm_world(env: Mapping[str, str]) -> int:
    for name in ("SLURM_NTASKS", "SLURM_NPROCS", "SLURM_STEP_NUM_TASKS"):
        if name in env:
            return _int_env(env, name)
    return 1


def _one_node_master(env: Mapping[str, str], world: int, local_size: int, how: str) -> str:
    addr = env.get("MASTER_ADDR")
    if addr:
        return addr
    if local_size != world:
        raise LaunchError(f"{how} launch across several nodes: export MASTER_ADDR (the first node's "
                          "address) and MASTER_PORT to every rank")
    return "127.0.0.1"


def discover(env: Optional[Mapping[str, str]] = None) -> DistInfo:
    """Read the launcher's variables from ``env`` (default ``os.environ``); starts nothing.

        >>> discover({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}).launcher
        'pmi'
    """
    env = os.environ if env is None else env
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None
    if "RANK" in env and "WORLD_SIZE" in env:
        local = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        return DistInfo(_int_env(env, "RANK"), _int_env(env, "WORLD_SIZE"), local, "torchrun",
                        env.get("MASTER_ADDR", "127.0.0.1"), port or DEFAULT_MASTER_PORT)
    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        world = _int_env(env, "OMPI_COMM_WORLD_SIZE")
        local_size = _int_env(env, "OMPI_COMM_WORLD_LOCAL_SIZE") if "OMPI_COMM_WORLD_LOCAL_SIZE" in env else world
        addr = _one_node_master(env, world, local_size, "Open MPI (mpirun -x MASTER_ADDR -x MASTER_PORT)")
        local = _int_env(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0
        return DistInfo(_int_env(env, "OMPI_COMM_WORLD_RANK"), world, local, "mpi", addr,
                        port or DEFAULT_MASTER_PORT)
    has_pmi = "PMI_RANK" in env and "PMI_SIZE" in env
    if _in_slurm_step(env) and not (has_pmi and _int_env(env, "PMI_SIZE") != _slurm_world(env)):
        world = _slurm_world(env)
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env)
        if port is None:
            port = slurm_master_port(env["SLURM_JOB_ID"]) if env.get("SLURM_JOB_ID") else DEFAULT_MASTER_PORT
        local = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        return DistInfo(_int_env(env, "SLURM_PROCID"), world, local, "slurm", addr, port)
    if has_pmi:
        world = _int_env(env, "PMI_SIZE")
        local_size = _int_env(env, "MPI_LOCALNRANKS") if "MPI_LOCALNRANKS" in env else world
        addr = _one_node_master(env, world, local_size, "MPICH / Intel MPI (mpiexec -genv MASTER_ADDR ...)")
        local = _int_env(env, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else 0
        return DistInfo(_int_env(env, "PMI_RANK"), world, local, "pmi", addr, port or DEFAULT_MASTER_PORT)
    if "SLURM_PROCID" in env and _slurm_world(env) > 1:
        raise LaunchError(
            f"this process runs in a Slurm batch script outside srun (SLURM_NTASKS={_slurm_world(env)} "
            "but no SLURM_STEP_ID): every task would wait for the others forever. Start it with "
            "`srun python pretrain_alcot.py ...` (or torchrun / mpirun) inside the script")
    return DistInfo(0, 1, 0, "single")


def resolve_backend(backend: str = "auto") -> str:
    if backend == "auto":
        return device.default_backend()
    if backend not in ("gloo", "nccl"):
        raise LaunchError(f"distributed backend {backend!r}: use auto, gloo or nccl")
    if backend == "nccl" and not device.cuda_available():
        raise LaunchError("--distributed-backend nccl needs CUDA; use gloo (or auto) on CPU")
    return backend


def init_distributed(backend: str = "auto", timeout_minutes: int = 10,
                     env: Optional[Mapping[str, str]] = None) -> DistInfo:
    """Discover ranks, bind the GPU and start the process group (nothing for a single process).

    If ``torch.distributed`` is already initialised, its rank and world size are returned.
    """
    info = discover(env)
    if dist.is_available() and dist.is_initialized():
        info.rank, info.world_size = dist.get_rank(), dist.get_world_size()
        info.backend = dist.get_backend()
        return info
    if info.launcher == "single":
        return info
    if not 0 <= info.rank < info.world_size:
        raise LaunchError(f"{info.launcher} rank {info.rank} is outside world size {info.world_size}")
    info.backend = resolve_backend(backend)
    device.set_device(info.local_rank)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = info.master_addr, str(info.master_port)
    dist.init_process_group(info.backend, init_method="env://", rank=info.rank,
                            world_size=info.world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return info
