"""Lap-mask attention on this machine: SDPA with the dense mask vs the unfused core vs FlexAttention.

    python bench/bench_lap_attention.py              # writes docs/bench_lap_attention.md
    python bench/bench_lap_attention.py --no-write --reps 3

The layout is a lap's: queries are the compacted slots of the last step, keys the slots of every
step so far (step-major), tokens halting at random between steps. Measured per call, medians,
backends alternating call by call: forward + backward (training) for SDPA and unfused (this
torch's FlexAttention has no CPU backward), and forward without gradient (evaluation, decoding
prefill) for all, FlexAttention both eager (its reference implementation) and compiled (the
compilation itself excluded). This is the measurement behind ``--attention-backend auto`` on CPUs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_alcot import hardware  # noqa: E402
from megatron_alcot.model.attention_backends import core_attention, resolve_backend  # noqa: E402
from megatron_alcot.model.compaction import Compaction  # noqa: E402
from megatron_alcot.model.lap_attention import LapMask  # noqa: E402
from megatron_alcot.utils.atomic import atomic_output  # noqa: E402

# (label, batch, seq, steps, heads, groups, head_dim)
SHAPES = [("quickstart, lap 2", 4, 256, 3, 4, 2, 32), ("seq 1024, lap 3", 2, 1024, 4, 8, 4, 64)]


def lap_inputs(b, s, steps, heads, groups, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    active = torch.ones(b, s, dtype=torch.bool)
    comps = []
    for _ in range(steps):
        comps.append(Compaction.build(active))
        active = active & (torch.rand(b, s, generator=g) < 0.7)
    q_comp = comps[-1]
    lm = LapMask.from_blocks(q_comp.order, q_comp.valid, [c.order for c in comps], [c.valid for c in comps])
    _, _, m, keys = lm.shape
    q = torch.randn(b, heads, m, d, generator=g).to(dtype)
    k = torch.randn(b, groups, keys, d, generator=g).to(dtype)
    v = torch.randn(b, groups, keys, d, generator=g).to(dtype)
    return q, k, v, lm


def _time(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(shape, dtype, reps, compiled_flex=True):
    _, b, s, steps, heads, groups, d = shape
    q, k, v, lm = lap_inputs(b, s, steps, heads, groups, d, dtype)
    dense = lm.dense()

    def train(backend):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        core_attention(qq, kk, vv, mask=dense, backend=backend).float().sum().backward()

    def infer(backend, mask):
        with torch.no_grad():
            core_attention(q, k, v, mask=mask, backend=backend)

    flex_compiled = None
    if compiled_flex:
        from torch.nn.attention.flex_attention import flex_attention
        kernel = torch.compile(flex_attention, dynamic=False)
        block = lm.block_mask()

        def flex_compiled():
            with torch.no_grad():
                kernel(q, k, v, block_mask=block, enable_gqa=heads != groups)
    cases = {"train sdpa": lambda: train("sdpa"), "train unfused": lambda: train("unfused"),
             "infer sdpa": lambda: infer("sdpa", dense), "infer unfused": lambda: infer("unfused", dense),
             "infer flex eager": lambda: infer("flex", lm)}
    if flex_compiled is not None:
        cases["infer flex compiled"] = flex_compiled
    for fn in cases.values():          # warm-up (and flex compilation)
        fn()
    times = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            times[name] += _time(fn, 1)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}, lm.shape


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip compiled FlexAttention")
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "bench_lap_attention.md"))
    args = parser.parse_args(argv)
    rows = []
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            ms, mshape = measure(shape, dtype, args.reps, not args.no_compile)
            rows.append((shape[0], dtype, mshape, ms))
            print(shape[0], dtype, mshape, {k: round(v, 2) for k, v in ms.items()}, flush=True)
    if not args.no_write:
        write_doc(args, rows)
    return 0


def write_doc(args, rows) -> None:
    names = list(rows[0][3])
    lines = [
        "# Lap-mask attention on CPU: SDPA (dense mask) vs unfused vs FlexAttention",
        "",
        "Written by `bench/bench_lap_attention.py`: one attention call over a lap's layout (queries =",
        "the last step's compacted slots, keys = every step's slots, step-major; tokens halt at",
        f"random between steps), milliseconds per call, median of {args.reps}, backends alternating.",
        "`train` = forward + backward; `infer` = forward without gradient. This torch's FlexAttention",
        "has no CPU backward, so it appears in the `infer` columns only; `flex eager` is its",
        "reference implementation, `flex compiled` its `torch.compile` kernel (compilation excluded).",
        "",
        f"Machine: {hardware.describe_cpu()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}.",
        "",
        "| layout | dtype | `[b, 1, m, M]` | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for label, dtype, mshape, ms in rows:
        lines.append(f"| {label} | {str(dtype).replace('torch.', '')} | {list(mshape)} | "
                     + " | ".join(f"{ms[n]:.2f}" for n in names) + " |")
    lines += ["", "Time relative to SDPA's, forward without gradient (> 1 = slower than SDPA): " + "; ".join(
        f"{label} {str(dtype).replace('torch.', '')}: " + ", ".join(
            f"{n.replace('infer ', '')} {ms[n] / ms['infer sdpa']:.2f}x" for n in names
            if n.startswith("infer") and n != "infer sdpa")
        for label, dtype, _, ms in rows) + ".", "",
        "Reading: FlexAttention's eager CPU path (what `--attention-backend flex` runs on a CPU "
        "without gradients) took " + _span(rows, "infer flex eager") + " SDPA's time; its compiled "
        "kernel took " + _span(rows, "infer flex compiled") + " SDPA's time, but pays a compilation "
        "per lap shape (compacted row counts change from lap to lap) and has no CPU backward either. "
        f"Load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
        "(a shared machine: single rows are noisy). "
        "What `--attention-backend auto` does with lap masks on CPU: "
        f"fp32 -> `{resolve_backend('auto', torch.zeros(1, 1, 1, 1), 256, lap_mask=True)}`, "
        f"bf16 at <= 256 keys -> `{resolve_backend('auto', torch.zeros(1, 1, 1, 1).bfloat16(), 256, lap_mask=True)}`; "
        "training needs a backward, which CPU FlexAttention lacks, so the flex path is never the "
        "training path here. On CUDA `auto` sends lap masks to FlexAttention (`FLEX_ON`); that "
        "choice has not been measured yet (see docs/bench_gpu.md).", ""]
    with atomic_output(args.output, "w") as f:
        f.write("\n".join(lines))
    print(f"-> {args.output}")


def _span(rows, name) -> str:
    ratios = [ms[name] / ms["infer sdpa"] for *_, ms in rows if name in ms]
    return f"{min(ratios):.2f}x to {max(ratios):.2f}x" if ratios else "n/a"


if __name__ == "__main__":
    sys.exit(main())
