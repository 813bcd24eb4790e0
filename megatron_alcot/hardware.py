"""What this machine is fast at, measured once and cached: the answer behind every ``auto``.

    from megatron_alcot import hardware
    m = hardware.machine()                    # Machine(bf16_speedup=4.3, onednn_speedup=2.2, ...)
    hardware.gemm_choice().choice             # 'onednn' or 'torch'   (--cpu-gemm-backend auto)
    hardware.attention_choice(torch.bfloat16).choice   # 'sdpa' or 'unfused' (--attention-backend auto)
    hardware.precision_choice("cpu").choice   # 'bf16' or 'fp32'      (quickstart / bench --precision auto)
    hardware.log_choice("--precision", hardware.precision_choice("cpu"))   # one line on stderr
    hardware.share_from_rank0(device)         # after init_process_group: every rank adopts rank 0's answers

Three questions are answered by timing small kernels (a fraction of a second in all, on one
thread: the kernels are compared, not the machine's thread count):

* is a bf16 (fp16) matmul faster than an fp32 one here? ``bf16_speedup`` = fp32 time / bf16 time;
* which library runs fp32 GEMMs faster: torch's own (MKL's sgemm in the x86 wheels) or oneDNN?
  ``onednn_speedup`` = torch time / oneDNN time, geometric mean over forward and weight-gradient
  GEMMs of a few model shapes;
* which attention core is faster, ``F.scaled_dot_product_attention`` or the unfused two matmuls
  (forward + backward), in fp32 and in bf16: ``unfused_speedup_*`` = SDPA time / unfused time.

A choice leaves the default (fp32, torch's GEMM, SDPA) only when the other side measured at
least ``MARGIN`` (1.15x) faster, so noise on a busy machine does not flip it. CPU vendor and ISA
flags (``avx512_bf16``, ``amx_bf16``...) are printed next to each choice as hints; they never
decide.

Cache: ``$MEGATRON_ALCOT_CACHE_DIR`` or ``~/.cache/megatron_alcot``, one small JSON per machine
(CPU model + flags), torch version and ISA limits (``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``), written atomically; the first writer wins, so concurrent processes agree.
Each measurement records the load per core; one taken on a busy machine (load > 1 per core) is
timed again by the first process that finds the machine quiet.

Override with ``MEGATRON_ALCOT_PROBE``, comma-separated items:

* ``bf16=fast|slow``, ``fp16=fast|slow``, ``gemm=torch|onednn``, ``attention=sdpa|unfused``:
  force that answer (the measurement is still shown);
* ``remeasure``: time again and rewrite the cache; ``nocache``: time, neither read nor write it;
* ``@file.json``: use the measurements in that file (a cache file from any machine).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron_alcot.utils.atomic import fsync_path, remove_quietly, temp_path_for

MARGIN = 1.15
ENV = "MEGATRON_ALCOT_PROBE"
CACHE_ENV = "MEGATRON_ALCOT_CACHE_DIR"
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
HINT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile",
              "asimd", "bf16", "sve", "sve2")
FORCEABLE = {"bf16": ("fast", "slow"), "fp16": ("fast", "slow"), "gemm": ("torch", "onednn"),
             "attention": ("sdpa", "unfused")}
CACHE_VERSION = 4


class ProbeOverrideError(ValueError):
    """``MEGATRON_ALCOT_PROBE`` could not be read; the message names the item and the fix."""


@dataclass
class Machine:
    """The measured answers (ratios > 1: the alternative is faster than the default)."""

    cpu: str                          # CPU model name (/proc/cpuinfo, platform)
    isa: List[str]                    # the ISA flags of HINT_FLAGS this CPU reports
    torch_version: str
    bf16_speedup: float               # fp32 matmul time / bf16 matmul time
    fp16_speedup: float
    onednn_speedup: float             # torch fp32 GEMM time / oneDNN's; 0.0 where oneDNN is unusable
    unfused_speedup_fp32: float       # SDPA fwd+bwd time / unfused fwd+bwd time
    unfused_speedup_bf16: float
    probe_seconds: float = 0.0
    isa_limits: str = ""              # ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA in force when measured
    load: float = 0.0                 # 1-minute load average per core when measured (> 1: a busy machine)
    source: str = "measured"          # measured | cache PATH | file PATH | rank 0
    forced: Dict[str, str] = field(default_factory=dict)   # from MEGATRON_ALCOT_PROBE

    # Plain attribute arithmetic, so a compiled forward can read them without a graph break.
    def low_precision_faster(self, key: str) -> bool:
        """``key`` ``bf16``/``fp16``: its matmuls beat fp32's by the margin (or forced fast)."""
        if key in self.forced:
            return self.forced[key] == "fast"
        return (self.bf16_speedup if key == "bf16" else self.fp16_speedup) >= MARGIN

    def onednn_faster(self) -> bool:
        if "gemm" in self.forced:
            return self.forced["gemm"] == "onednn"
        return self.onednn_speedup >= MARGIN

    def unfused_faster(self, low_precision: bool) -> bool:
        if "attention" in self.forced:
            return self.forced["attention"] == "unfused"
        return (self.unfused_speedup_bf16 if low_precision else self.unfused_speedup_fp32) >= MARGIN

    def describe(self) -> str:
        limits = f" limited by {self.isa_limits}" if self.isa_limits else ""
        busy = f", measured at load {self.load:.1f}/core" if self.load > 1 else ""
        return f"{self.cpu} [{' '.join(self.isa) or 'no listed ISA flags'}{limits}], torch {self.torch_version}{busy}"


@dataclass(frozen=True)
class Decision:
    """An ``auto`` resolved: the choice and, on one line, why."""

    choice: str
    reason: str

    def line(self, flag: str) -> str:
        return f"{flag} auto -> {self.choice}: {self.reason}"


# ----------------------------------------------------------------------------- the machine's identity
def _cpuinfo() -> Tuple[str, List[str]]:
    model, flags = "", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = value.split()
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown CPU", flags


def identity() -> Dict[str, object]:
    """What the cache is keyed on: CPU model and flags, torch and the ISA limits."""
    model, flags = _cpuinfo()
    return {"cpu": model, "machine": platform.machine(),
            "flags_sha": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
            "isa": [f for f in HINT_FLAGS if f in flags], "torch": torch.__version__,
            "isa_env": {k: os.environ.get(k, "") for k in ISA_ENV},
            "version": CACHE_VERSION}


def describe_cpu() -> str:
    """The CPU as bench pages name it, without measuring anything: ``AMD EPYC [avx2 fma avx512f
    avx512_bf16], 2 CPUs`` (model, the ISA flags that decide kernels, ISA limits set in the
    environment, CPUs visible)."""
    ident = identity()
    limits = " ".join(f"{k}={v}" for k, v in ident["isa_env"].items() if v)
    flags = " ".join(ident["isa"]) or "no listed ISA flags"
    return f"{ident['cpu']} [{flags}{' limited by ' + limits if limits else ''}], {os.cpu_count()} CPUs"


def cache_path(ident: Optional[Dict[str, object]] = None) -> str:
    ident = ident or identity()
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "megatron_alcot")
    return os.path.join(root, f"hardware-{digest}.json")


# ----------------------------------------------------------------------------- timing
def _ratio(default: Callable[[], object], other: Callable[[], object], rounds: int,
           budget_s: float = 0.03, max_rounds: int = 25) -> float:
    """Best time of ``default`` / best time of ``other``, the two interleaved so that load from
    other processes hits both alike; at least ``rounds`` rounds, more (up to ``max_rounds``) while
    the pair has used less than ``budget_s``, so fast kernels get more chances at an undisturbed run."""
    default(), other()
    best_d = best_o = math.inf
    spent, done = 0.0, 0
    while done < rounds or (spent < budget_s and done < max_rounds):
        t0 = time.perf_counter()
        default()
        t1 = time.perf_counter()
        other()
        t2 = time.perf_counter()
        best_d, best_o = min(best_d, t1 - t0), min(best_o, t2 - t1)
        spent, done = spent + t2 - t0, done + 1
    return best_d / best_o


def _matmul_speedup(dtype: torch.dtype, rounds: int = 5) -> float:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 256, generator=g), torch.randn(256, 256, generator=g)
    al, bl = a.to(dtype), b.to(dtype)
    return _ratio(lambda: a @ b, lambda: al @ bl, rounds)


GEMM_SHAPES = ((256, 128, 384), (256, 384, 128), (256, 256, 1024), (256, 128, 2048))   # rows, in, out


def _onednn_speedup(rounds: int = 4) -> float:
    from megatron_alcot.parallel.tensor_parallel import gemm
    if not gemm.onednn_available():
        return 0.0
    g = torch.Generator().manual_seed(0)
    logs = []
    for rows, k, n in GEMM_SHAPES:
        x, w, dy = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(rows, n, generator=g)
        logs.append(math.log(_ratio(lambda: gemm.matmul_nt(x, w, "torch"), lambda: gemm.matmul_nt(x, w, "onednn"),
                                    rounds)))
        logs.append(math.log(_ratio(lambda: gemm.weight_grad(x, dy, "torch"),
                                    lambda: gemm.weight_grad(x, dy, "onednn"), rounds)))
    return math.exp(sum(logs) / len(logs))


def _attention_speedup(dtype: torch.dtype, rounds: int = 4) -> float:
    from megatron_alcot.model.attention_backends import core_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 4, 128, 32, generator=g).to(dtype).requires_grad_() for _ in range(3))
    dout = torch.randn(4, 4, 128, 32, generator=g).to(dtype)

    def step(backend):
        out = core_attention(q, k, v, None, 0.0, backend)
        torch.autograd.grad(out, (q, k, v), dout)
    return _ratio(lambda: step("sdpa"), lambda: step("unfused"), rounds)


def _load_per_core() -> float:
    return os.getloadavg()[0] / (os.cpu_count() or 1) if hasattr(os, "getloadavg") else 0.0


def measure() -> Machine:
    """Time the kernels now (no cache, no override). One thread: the kernel choice is what is
    compared, and on a shared machine multi-threaded timings of small kernels are mostly waiting."""
    from megatron_alcot.model import attention_backends  # noqa: F401  (imports are not the probe's cost)
    from megatron_alcot.parallel.tensor_parallel import gemm  # noqa: F401
    ident = identity()
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)
    # Real fp32 CPU kernels whatever the caller's context: models are also built on the meta
    # device (memory plans), under autocast, inference mode or another default dtype.
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"), torch.inference_mode(False), torch.autocast("cpu", enabled=False):
            with torch.no_grad():
                bf16 = _matmul_speedup(torch.bfloat16)
                fp16 = _matmul_speedup(torch.float16)
                onednn = _onednn_speedup()
            with torch.enable_grad():
                att32 = _attention_speedup(torch.float32)
                att16 = _attention_speedup(torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    return Machine(cpu=str(ident["cpu"]), isa=list(ident["isa"]), torch_version=torch.__version__,
                   bf16_speedup=round(bf16, 3), fp16_speedup=round(fp16, 3),
                   onednn_speedup=round(onednn, 3), unfused_speedup_fp32=round(att32, 3),
                   unfused_speedup_bf16=round(att16, 3), probe_seconds=round(time.perf_counter() - start, 3),
                   isa_limits=" ".join(f"{k}={v}" for k, v in ident["isa_env"].items() if v),
                   load=round(_load_per_core(), 2))


# ----------------------------------------------------------------------------- override, cache
@dataclass
class Override:
    forced: Dict[str, str] = field(default_factory=dict)
    remeasure: bool = False
    nocache: bool = False
    file: Optional[str] = None


def parse_override(text: str) -> Override:
    """``MEGATRON_ALCOT_PROBE``'s value, e.g. ``"bf16=slow,gemm=torch"`` or ``"@m.json,remeasure"``."""
    example = "e.g. MEGATRON_ALCOT_PROBE=bf16=slow,gemm=torch"
    out = Override()
    for i, raw in enumerate(text.split(","), 1):
        item = raw.strip()
        where = f"{ENV}={text!r}, item {i} {item!r}"
        if not item:
            continue
        if item in ("remeasure", "nocache"):
            setattr(out, item, True)
        elif item.startswith("@"):
            if not os.path.isfile(item[1:]):
                raise ProbeOverrideError(f"{where}: no such file; give a JSON file written by "
                                         f"megatron_alcot.hardware (see {CACHE_ENV})")
            out.file = item[1:]
        elif "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
            if key not in FORCEABLE:
                raise ProbeOverrideError(f"{where}: unknown answer {key!r}; choose one of "
                                         f"{', '.join(FORCEABLE)} ({example})")
            if value not in FORCEABLE[key]:
                raise ProbeOverrideError(f"{where}: {key} takes {' or '.join(FORCEABLE[key])} ({example})")
            out.forced[key] = value
        else:
            raise ProbeOverrideError(f"{where}: expected KEY=VALUE, remeasure, nocache or @file.json ({example})")
    return out


def _from_json(data: dict, source: str) -> Machine:
    names = {f.name for f in fields(Machine)}
    profile = data.get("machine", data)
    missing = names - set(profile) - {"probe_seconds", "isa_limits", "load", "source", "forced"}
    if missing:
        raise ProbeOverrideError(f"{source}: not a hardware measurement file (missing {', '.join(sorted(missing))})")
    m = Machine(**{k: v for k, v in profile.items() if k in names})
    m.source, m.forced = source, {}
    return m


def _read_cache(path: str) -> Optional[Machine]:
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("identity") != identity():
            return None
        m = _from_json(data, f"cache {path}")
    except (OSError, ValueError, TypeError):
        return None
    from megatron_alcot.parallel.tensor_parallel import gemm
    if m.onednn_speedup == 0.0 and gemm.onednn_available():
        return None                 # timed without real CPU kernels (e.g. on the meta device): retime
    return m


def _write_cache(path: str, m: Machine, replace: bool) -> Machine:
    """Write atomically. Without ``replace`` the first writer wins and everyone reads its file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = temp_path_for(path)
    body = {"identity": identity(), "machine": {k: v for k, v in asdict(m).items() if k not in ("source", "forced")}}
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=1, sort_keys=True)
        fsync_path(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                winner = _read_cache(path)
                if winner is not None:
                    return winner
                os.replace(tmp, path)       # what was there is damaged: ours replaces it
            except OSError:           # filesystems without hard links
                os.replace(tmp, path)
    finally:
        remove_quietly(tmp)
    return m


def load(env: Optional[str] = None) -> Machine:
    """The machine's answers: from ``@file``, the cache, or a measurement; overrides applied."""
    ov = parse_override(os.environ.get(ENV, "") if env is None else env)
    if ov.file:
        with open(ov.file) as f:
            try:
                m = _from_json(json.load(f), f"file {ov.file}")
            except ValueError as exc:
                raise ProbeOverrideError(f"{ENV}: @{ov.file}: {exc}") from None
    else:
        path = cache_path()
        m = None if (ov.remeasure or ov.nocache) else _read_cache(path)
        # An answer timed on a busy machine is replaced by the first one timed on a quiet one.
        retime = m is not None and m.load > 1 and _load_per_core() <= 1
        if m is None or retime:
            m = measure()
            if not ov.nocache:
                try:
                    m = _write_cache(path, m, replace=ov.remeasure or retime)
                except OSError as exc:
                    print(f"[hardware] could not write the probe cache {path}: {exc}", file=sys.stderr)
                if not m.source.startswith("cache"):
                    m.source = "measured"
    m.forced = dict(ov.forced)
    return m


_MACHINE: Optional[Machine] = None
_ON_CHANGE: List[Callable[[], None]] = []


def on_change(callback: Callable[[], None]) -> None:
    """Call ``callback`` whenever :func:`set_machine` replaces the answers (modules that cache a
    decision for their hot path register here)."""
    _ON_CHANGE.append(callback)


def machine() -> Machine:
    """This process's answers (probed or read once)."""
    global _MACHINE
    if _MACHINE is None:
        _MACHINE = load()
    return _MACHINE


def set_machine(m: Optional[Machine]) -> None:
    """Adopt ``m`` (another rank's answers, a test's fake); ``None`` probes again on next use."""
    global _MACHINE
    _MACHINE = m
    for callback in _ON_CHANGE:
        callback()


def share_from_rank0(device: Optional[torch.device] = None) -> Machine:
    """Broadcast rank 0's answers to every rank (one object broadcast on ``device``, which must be
    the backend's device: CUDA for NCCL). Call on all ranks after ``init_process_group``."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return machine()
    payload = [asdict(machine()) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(payload, src=0, device=device)
    if dist.get_rank() != 0:
        m = Machine(**payload[0])
        m.source = f"rank 0 ({m.source})"
        set_machine(m)
    return machine()


# ----------------------------------------------------------------------------- decisions
def _x(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


def _why(measured: str, m: Machine) -> str:
    return f"{measured}, margin {MARGIN}x; {m.describe()}; {m.source}"


def _forced(m: Machine, key: str, measured: str) -> Optional[str]:
    if key in m.forced:
        return f"forced by {ENV} {key}={m.forced[key]} (measured {measured}); {m.describe()}"
    return None


def low_precision_fast(dtype: torch.dtype) -> Tuple[bool, str]:
    """Whether ``dtype`` (bf16/fp16) matmuls beat fp32 here, and the measured ratio as text."""
    m = machine()
    key = "bf16" if dtype == torch.bfloat16 else "fp16"
    speedup = m.bf16_speedup if key == "bf16" else m.fp16_speedup
    return m.low_precision_faster(key), f"{key} matmul {_x(speedup)} fp32's speed"


def precision_choice(device="cpu") -> Decision:
    """``bf16`` where bf16 is fast on ``device``, else ``fp32``."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return Decision("bf16" if ok else "fp32", f"CUDA device {torch.cuda.get_device_name(device)} "
                        f"{'supports' if ok else 'lacks'} bf16 (not timed)")
    fast, measured = low_precision_fast(torch.bfloat16)
    m = machine()
    reason = _forced(m, "bf16", measured) or _why(measured, m)
    return Decision("bf16" if fast else "fp32", reason)


def gemm_choice() -> Decision:
    """``onednn`` or ``torch`` for plain fp32 CPU GEMMs (``--cpu-gemm-backend auto``)."""
    from megatron_alcot.parallel.tensor_parallel import gemm
    m = machine()
    measured = (f"oneDNN fp32 GEMM {_x(m.onednn_speedup)} torch's speed" if m.onednn_speedup
                else "oneDNN unusable in this torch build")
    reason = _forced(m, "gemm", measured) or _why(measured, m)
    if m.onednn_faster() and not gemm.onednn_available():
        return Decision("torch", reason + "; oneDNN is unusable here, so torch")
    return Decision("onednn" if m.onednn_faster() else "torch", reason)


def attention_choice(dtype: torch.dtype) -> Decision:
    """``unfused`` or ``sdpa`` for CPU attention in ``dtype`` (the key-count limit applies on top)."""
    m = machine()
    low = dtype in (torch.bfloat16, torch.float16)
    speedup = m.unfused_speedup_bf16 if low else m.unfused_speedup_fp32
    measured = f"unfused attention {_x(speedup)} SDPA's speed in {'bf16' if low else 'fp32'}"
    reason = _forced(m, "attention", measured) or _why(measured, m)
    return Decision("unfused" if m.unfused_faster(low) else "sdpa", reason)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def log_choice(flag: str, decision: Decision, emit: Callable[[str], None] = _stderr) -> None:
    """``decision`` for ``flag`` on one line, through ``emit`` (a logger's print; stderr by default)."""
    emit(f"[hardware] {decision.line(flag)}")


def slow_precision_warning(dtype: torch.dtype, flag: str) -> Optional[str]:
    """One warning line when ``flag`` asks for a low precision that measured slower than fp32 here."""
    m = machine()
    key = "bf16" if dtype == torch.bfloat16 else "fp16"
    _, measured = low_precision_fast(dtype)
    speedup = m.bf16_speedup if key == "bf16" else m.fp16_speedup
    slower = m.forced[key] == "slow" if key in m.forced else speedup < 1.0
    if not slower:
        return None
    how = f"{measured}, forced slow by {ENV}" if key in m.forced else measured
    return f"warning: {flag} on a CPU where {how} ({m.describe()}); going on, but fp32 would be faster here"


def report(model_cfg, autocast_dtype: Optional[torch.dtype], device,
           emit: Callable[[str], None] = _stderr) -> None:
    """What training logs: one line per ``auto`` the model resolves here, and the slow-precision warning."""
    if torch.device(device).type != "cpu":
        return
    if getattr(model_cfg, "cpu_gemm_backend", None) == "auto" and autocast_dtype is None:
        log_choice("--cpu-gemm-backend", gemm_choice(), emit)
    if getattr(model_cfg, "attention_backend", None) == "auto":
        log_choice("--attention-backend", attention_choice(autocast_dtype or torch.float32), emit)
    if autocast_dtype is not None:
        warning = slow_precision_warning(autocast_dtype, "--bf16" if autocast_dtype == torch.bfloat16 else "--fp16")
        if warning:
            emit(f"[hardware] {warning}")


__all__ = ["Decision", "MARGIN", "Machine", "ProbeOverrideError", "attention_choice", "cache_path",
           "gemm_choice", "identity", "load", "log_choice", "low_precision_fast", "machine", "measure", "on_change",
           "parse_override", "precision_choice", "report", "set_machine", "share_from_rank0",
           "slow_precision_warning"]
