"""fp32 CPU GEMM rate of torch's default library (MKL in the x86 wheels) vs oneDNN, side by side.

    python bench/bench_gemm.py                 # writes docs/bench_gemm.md
    python bench/bench_gemm.py --no-write

Measures the three GEMMs of a linear layer (forward ``x @ W.T``, input gradient ``dy @ W``, weight
gradient ``dy.T @ x``) at the shapes of the quickstart model and of the throughput bench's wide
shape, plus one square 2048³ product, through ``parallel/tensor_parallel/gemm.py`` exactly as the
layers call them. The two libraries alternate call by call, so machine noise hits both alike.
This is the measurement behind ``--cpu-gemm-backend auto``.
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
from megatron_alcot.parallel.tensor_parallel import gemm  # noqa: E402
from megatron_alcot.utils.atomic import atomic_output  # noqa: E402

# (label, rows, in, out): tokens x fan-in -> fan-out
SHAPES = [
    ("quickstart QKV", 1024, 128, 384), ("quickstart proj", 1024, 128, 128),
    ("quickstart fc1", 1024, 128, 768), ("quickstart fc2", 1024, 384, 128),
    ("quickstart LM head chunk", 256, 128, 4096),
    ("wide fc1", 2048, 256, 1408), ("wide fc2", 2048, 704, 256),
    ("square", 2048, 2048, 2048),
]
KINDS = {
    "forward": lambda x, w, dy, b: gemm.matmul_nt(x, w, b),
    "input grad": lambda x, w, dy, b: gemm.matmul_nn(dy, w, b),
    "weight grad": lambda x, w, dy, b: gemm.weight_grad(x, dy, b),
}


def rate(rows, fan_in, fan_out, kind, reps):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, fan_in, generator=g), torch.randn(fan_out, fan_in, generator=g)
    dy = torch.randn(rows, fan_out, generator=g)
    fn = KINDS[kind]
    times = {"torch": [], "onednn": []}
    for _ in range(3):
        for b in times:
            fn(x, w, dy, b)
    for _ in range(reps):
        for b in times:
            t = time.perf_counter()
            fn(x, w, dy, b)
            times[b].append(time.perf_counter() - t)
    macs = rows * fan_in * fan_out
    return {b: macs / statistics.median(t) / 1e9 for b, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--output", default=os.path.join(ROOT, "docs", "bench_gemm.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if not gemm.onednn_available():
        print("this torch build has no oneDNN; nothing to compare")
        return 1
    rows = []
    for label, n, i, o in SHAPES:
        for kind in KINDS:
            r = rate(n, i, o, kind, args.reps if n * i * o < 2 ** 30 else 5)
            rows.append((label, n, i, o, kind, r["torch"], r["onednn"]))
            print(f"{label:26s} {kind:11s} [{n}x{i}]·[{i}x{o}]: torch {r['torch']:6.0f}  oneDNN "
                  f"{r['onednn']:6.0f} GMAC/s  ({r['onednn'] / r['torch']:.2f}x)", flush=True)
    if not args.no_write:
        write_doc(args, rows)
    return 0


def write_doc(args, rows) -> None:
    ratios = [d / t for *_, t, d in rows]
    lines = [
        "# fp32 CPU GEMMs: torch's default library vs oneDNN",
        "",
        "Written by `bench/bench_gemm.py`: the three GEMMs of a linear layer at the model's shapes,",
        "called through `parallel/tensor_parallel/gemm.py` as the layers call them, the two libraries",
        f"alternating call by call; median of {args.reps} calls (5 for the square product).",
        "",
        f"Machine: {hardware.machine().describe()}, CPU vendor {gemm.cpu_vendor() or 'unknown'}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; `--cpu-gemm-backend auto` "
        f"picks **{'onednn' if gemm.auto_prefers_onednn() else 'torch'}** here ({hardware.gemm_choice().reason.split(';')[0]}).",
        "",
        "| shape | GEMM | torch GMAC/s | oneDNN GMAC/s | oneDNN / torch |",
        "|---|---|---|---|---|",
    ]
    for label, n, i, o, kind, t, d in rows:
        lines.append(f"| {label} `[{n}x{i}]·[{i}x{o}]` | {kind} | {t:.0f} | {d:.0f} | {d / t:.2f}x |")
    lines += ["", f"oneDNN / torch over all rows: {min(ratios):.2f}x to {max(ratios):.2f}x "
              f"(median {statistics.median(ratios):.2f}x).", "",
              "torch's fp32 `mm` calls MKL's sgemm, which picks its kernels by CPU vendor (on this AMD "
              "CPU `MKL_ENABLE_INSTRUCTIONS` does not change its rate); oneDNN picks its kernels from the "
              "CPU's instruction set, whoever made it. `auto` follows megatron_alcot.hardware's own "
              "shorter timing of both libraries on the machine it runs on.", ""]
    with atomic_output(args.output, "w") as f:
        f.write("\n".join(lines))
    print(f"-> {args.output}")


if __name__ == "__main__":
    sys.exit(main())
