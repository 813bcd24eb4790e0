"""The memory plan against measured peaks of small CPU training runs.

    .venv/bin/python bench/bench_memory_plan.py [--rows all|quick] [--out docs/bench_memory_plan.md]

Each grid row runs ``training.train.train`` (what ``pretrain_alcot.py`` runs) for two iterations in
a gloo world of spawned CPU processes, under ``torch.profiler`` with ``profile_memory``: every
allocation and free of the CPU allocator from before the model is built. The measured peak of a rank
is the largest number of live bytes during its second ``train_step`` (Adam state exists, buffers are
warm), counted from the start of ``train``. The plan is ``memory_plan.plan_memory`` for the same
flags with no runtime reserve (no CUDA here). The page shows plan, measured and their ratio for the
rank with the largest measured peak, and the worst ratio over all ranks against their stage's plan.

The model is small enough for 2 cores but shaped so that activations are a large share of the peak
(ℓmax 3 without recompute: most of it), so the comparison tests the activation formula, not only
the parameter counts.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402
from dist_utils import run_distributed  # noqa: E402

from megatron_alcot.utils.atomic import atomic_output  # noqa: E402

BASE = ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--ffn-hidden-size", "384",
        "--seq-length", "128", "--micro-batch-size", "2", "--vocab-size", "512",
        "--tokenizer-type", "NullTokenizer", "--mock-data", "--train-iters", "2", "--eval-iters", "0",
        "--num-workers", "0", "--log-interval", "100", "--quiet", "--lr", "1e-3",
        "--untie-embeddings-and-output-weights", "--attention-backend", "sdpa",
        "--cpu-gemm-backend", "torch", "--latent-method", "alcot"]

# (label, world size, extra flags). PP rows use one micro-batch, so GPipe and 1F1B hold the same.
GRID = [
    ("TP1 PP1 DP1 ZeRO0 ℓ0 none", 1, ["--latent-max-steps", "0"]),
    ("TP1 PP1 DP1 ZeRO0 ℓ3 none", 1, ["--latent-max-steps", "3"]),
    ("TP1 PP1 DP1 ZeRO0 ℓ0 full", 1, ["--latent-max-steps", "0", "--recompute-granularity", "full"]),
    ("TP1 PP1 DP1 ZeRO0 ℓ3 full", 1, ["--latent-max-steps", "3", "--recompute-granularity", "full"]),
    ("TP1 PP1 DP1 ZeRO0 ℓ3 selective", 1, ["--latent-max-steps", "3", "--recompute-granularity", "selective"]),
    ("TP2 PP1 DP1 ZeRO0 ℓ0 none", 2, ["--latent-max-steps", "0", "--tensor-model-parallel-size", "2"]),
    ("TP2 PP1 DP1 ZeRO0 ℓ3 none", 2, ["--latent-max-steps", "3", "--tensor-model-parallel-size", "2"]),
    ("TP2 PP1 DP1 ZeRO0 ℓ0 full", 2, ["--latent-max-steps", "0", "--tensor-model-parallel-size", "2",
                                      "--recompute-granularity", "full"]),
    ("TP2 PP1 DP1 ZeRO0 ℓ3 full", 2, ["--latent-max-steps", "3", "--tensor-model-parallel-size", "2",
                                      "--recompute-granularity", "full"]),
    ("TP1 PP2 DP1 ZeRO0 ℓ0 none", 2, ["--latent-max-steps", "0", "--pipeline-model-parallel-size", "2"]),
    ("TP1 PP2 DP1 ZeRO0 ℓ3 none", 2, ["--latent-max-steps", "3", "--pipeline-model-parallel-size", "2"]),
    ("TP1 PP2 DP1 ZeRO0 ℓ3 full", 2, ["--latent-max-steps", "3", "--pipeline-model-parallel-size", "2",
                                      "--recompute-granularity", "full"]),
    ("TP1 PP1 DP2 ZeRO0 ℓ3 none", 2, ["--latent-max-steps", "3"]),
    ("TP1 PP1 DP2 ZeRO1 ℓ3 none", 2, ["--latent-max-steps", "3", "--use-distributed-optimizer",
                                      "--zero-stage", "1"]),
    ("TP1 PP1 DP2 ZeRO2 ℓ3 none", 2, ["--latent-max-steps", "3", "--use-distributed-optimizer",
                                      "--zero-stage", "2"]),
    ("TP1 PP1 DP2 ZeRO1 ℓ0 full", 2, ["--latent-max-steps", "0", "--use-distributed-optimizer",
                                      "--zero-stage", "1", "--recompute-granularity", "full"]),
    ("TP1 PP1 DP2 ZeRO2 ℓ0 full", 2, ["--latent-max-steps", "0", "--use-distributed-optimizer",
                                      "--zero-stage", "2", "--recompute-granularity", "full"]),
]
QUICK = ("TP1 PP1 DP1 ZeRO0 ℓ3 none", "TP1 PP1 DP1 ZeRO0 ℓ3 full")
STEP_MARK = "memory_plan_bench.train_step"


def _measure_rank(rank, world, argv):
    """Peak live CPU-allocator bytes of this rank during its last ``train_step``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import megatron_alcot.training.train as train_mod
    original = train_mod.train_step

    def marked(*args, **kwargs):
        with record_function(STEP_MARK):
            return original(*args, **kwargs)

    train_mod.train_step = marked
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            train_mod.train(list(argv))
    finally:
        train_mod.train_step = original
    events = list(prof.profiler.kineto_results.events())
    steps = sorted((e.start_ns(), e.end_ns()) for e in events if e.name() == STEP_MARK)
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    lo, hi = steps[-1]
    live, peak = 0, 0
    for ts, nbytes in memory:
        live += nbytes
        if lo <= ts <= hi:
            peak = max(peak, live)
    return peak


def measure(argv, world: int):
    """Measured peak bytes of every rank for ``argv`` (pretrain flags) in a world of ``world``."""
    return run_distributed(_measure_rank, world, list(argv), timeout=600)


def plan_for(argv, world: int):
    from megatron_alcot.arguments import parse_args
    from megatron_alcot.memory_plan import plan_memory, validate_for_plan
    args = parse_args(list(argv))
    validate_for_plan(args, world)
    return plan_memory(args, world, None, reserve_gib=0.0)


def compare(argv, world: int) -> dict:
    """Plan and measurement side by side for one configuration."""
    plan = plan_for(argv, world)
    peaks = measure(argv, world)
    per_stage = world // plan.pp
    ratios = [plan.totals[r // per_stage] / p for r, p in enumerate(peaks)]
    top = max(range(world), key=lambda r: peaks[r])
    acts = sum(plan.row("activations held (× in flight)").bytes) / max(1, sum(plan.totals))
    return {"plan": plan.totals[top // per_stage], "measured": peaks[top],
            "ratio": plan.totals[top // per_stage] / peaks[top],
            "worst": max(ratios, key=lambda x: abs(x - 1.0)), "activation_share": acts, "plan_obj": plan}


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model = fields.get("Model name", "").strip()
        cpus = fields.get("CPU(s)", "").strip()
        return f"{model}, {cpus} CPUs (lscpu)"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", choices=("all", "quick"), default="all")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "bench_memory_plan.md"))
    opts = ap.parse_args(argv)
    grid = [g for g in GRID if opts.rows == "all" or g[0] in QUICK]
    table = ["| configuration | world | plan (MiB) | measured (MiB) | plan / measured | worst rank | "
             "activations in plan |", "|---|---|---|---|---|---|---|"]
    worst = 0.0
    started = time.time()
    for label, world, extra in grid:
        flags = BASE + extra
        if "DP2" in label or "TP2" in label or "PP2" in label:
            flags = flags + ["--global-batch-size", str(2 * (2 if "DP2" in label else 1))]
        r = compare(flags, world)
        worst = max(worst, abs(r["worst"] - 1.0))
        row = (f"| {label} | {world} | {r['plan'] / 2 ** 20:.2f} | {r['measured'] / 2 ** 20:.2f} | "
               f"{r['ratio']:.3f} | {r['worst']:.3f} | {100 * r['activation_share']:.0f} % |")
        table.append(row)
        print(row, flush=True)
    text = "\n".join([
        "# Memory plan vs measured peak",
        "",
        f"Measured by `bench/bench_memory_plan.py --rows {opts.rows}` on {_machine()}, torch "
        f"{torch.__version__}, gloo, one thread per rank ({time.time() - started:.0f} s in all).",
        "",
        "Each row trains the same model (4 layers, hidden 128, 4 heads, FFN 384, vocabulary 512, "
        "sequence 128, micro-batch 2, fp32, untied, ALCoT) for two iterations through "
        "`training.train.train`, under `torch.profiler` with `profile_memory`. *measured* is the "
        "largest count of live CPU-allocator bytes during the second iteration, from the start of "
        "`train` (the rank with the largest peak); *plan* is `tools/plan_memory.py`'s total for "
        "that rank's stage with no runtime reserve; *worst rank* is the plan/measured ratio "
        "farthest from 1 over all ranks; *activations in plan* is the activation share of the plan, "
        "so a row cannot agree through the parameter counts alone. Every token takes every lap "
        "here (the routers start at continue probability 0.9 and halting threshold 0.1), which "
        "is what the plan assumes. PP rows use one micro-batch, where GPipe and 1F1B hold the same.",
        "",
        *table,
        "",
        f"Largest deviation over all ranks of all rows: {100 * worst:.1f} % (goal: within 10 %).",
        "",
    ])
    with atomic_output(opts.out, "w") as fh:
        fh.write(text)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
