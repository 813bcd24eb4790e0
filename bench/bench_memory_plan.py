"""The memory plan against measured peaks of small CPU training runs.

    .venv/bin/python bench/bench_memory_plan.py [--rows all|quick] [--repeats 3] [--out docs/bench_memory_plan.md]

Each grid row runs ``training.train.train`` (what ``pretrain_alcot.py`` runs) for five iterations in
a gloo world of spawned CPU processes, ``--repeats`` times, under ``torch.profiler`` with
``profile_memory`` and the CPU allocator counting every thread's allocations and frees
(``memory_timeline``). The measured peak of a rank is the largest number of live bytes during its
``train_step`` calls after the first (Adam state exists, buffers are warm), counted from before
the model is built. The plan is ``memory_plan.plan_memory`` for the same flags with no runtime
reserve (no CUDA here). The page shows plan, the measured range over the runs and the plan over
the largest run for the rank with the largest peak, and the worst ratio over all ranks and runs.

The model is small enough for 2 cores but shaped so that activations are a large share of the peak
(ℓmax 3 without recompute: most of it), so the comparison tests the activation formula, not only
the parameter counts.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import memory_timeline  # noqa: E402
from megatron_alcot import hardware  # noqa: E402
from megatron_alcot.utils.atomic import atomic_output  # noqa: E402

BASE = ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--ffn-hidden-size", "384",
        "--seq-length", "128", "--micro-batch-size", "2", "--vocab-size", "512",
        "--tokenizer-type", "NullTokenizer", "--mock-data", "--train-iters", "5", "--eval-iters", "0",
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
    ("TP1 PP1 DP2 ZeRO2 ℓ3 none, 0.5 MiB buckets", 2, ["--latent-max-steps", "3", "--use-distributed-optimizer",
                                                      "--zero-stage", "2", "--ddp-bucket-size-mb", "0.5"]),
    ("TP1 PP1 DP2 ZeRO1 ℓ0 full", 2, ["--latent-max-steps", "0", "--use-distributed-optimizer",
                                      "--zero-stage", "1", "--recompute-granularity", "full"]),
    ("TP1 PP1 DP2 ZeRO2 ℓ0 full", 2, ["--latent-max-steps", "0", "--use-distributed-optimizer",
                                      "--zero-stage", "2", "--recompute-granularity", "full"]),
]
QUICK = ("TP1 PP1 DP1 ZeRO0 ℓ3 none", "TP1 PP1 DP1 ZeRO0 ℓ3 full")
STEP_MARK = "memory_plan_bench.train_step"
AFTER_BACKWARD_MARK = "memory_plan_bench.after_backward"


def _measure_rank(rank, world, argv):
    """This rank's timeline over ``training.train.train``: peak live CPU-allocator bytes (every
    thread) during its ``train_step`` calls after the first, split into the forward-backward and
    what follows it (gradient reduction, optimizer step, parameter all-gather), and the live bytes
    as each step starts."""
    import megatron_alcot.training.train as train_mod
    import megatron_alcot.training.train_step as step_mod
    from megatron_alcot.arguments import parse_args
    config = parse_args(list(argv))
    timeline = memory_timeline.record(lambda: train_mod.train(config), {
        STEP_MARK: (train_mod, "train_step"), AFTER_BACKWARD_MARK: (step_mod, "allreduce_tied_embedding_grads")})
    steps, after = timeline.spans[STEP_MARK], timeline.spans[AFTER_BACKWARD_MARK]
    fb = [timeline.peak_between(lo, a[0]) for (lo, _), a in zip(steps, after)]
    rest = [timeline.peak_between(a[0], hi) for (_, hi), a in zip(steps, after)]
    return {"peak": max(fb[1:] + rest[1:]), "forward_backward": max(fb[1:]), "after_backward": max(rest[1:]),
            "between_steps": timeline.live_before(STEP_MARK)}


def _rank_main(rank, world, port, argv, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        queue.put((rank, _measure_rank(rank, world, argv), None))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        queue.put((rank, None, repr(exc)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure(argv, world: int):
    """Every rank's ``_measure_rank`` result for ``argv`` (pretrain flags) in a gloo world of
    ``world`` spawned CPU processes on 127.0.0.1."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, list(argv), queue)) for r in range(world)]
    for p in procs:
        p.start()
    peaks = {}
    try:
        for _ in range(world):
            rank, peak, error = queue.get(timeout=900)
            if error:
                raise RuntimeError(f"rank {rank} of {argv}: {error}")
            peaks[rank] = peak
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [peaks[r] for r in range(world)]


def plan_for(argv, world: int):
    from megatron_alcot.arguments import parse_args
    from megatron_alcot.memory_plan import plan_memory, validate_for_plan
    args = parse_args(list(argv))
    validate_for_plan(args, world)
    return plan_memory(args, world, None, reserve_gib=0.0, device="cpu")


def compare(argv, world: int, repeats: int = 3) -> dict:
    """Plan and measurement side by side for one configuration, measured ``repeats`` times.
    ``measured``: (min, max) over the runs of the peak of the rank with the largest one; ``ratio``:
    plan over that maximum; ``worst``: the plan/peak ratio farthest from 1 over every rank and run;
    ``between``: (min, max) live bytes of that rank as iterations 2 to 5 start, over the runs."""
    plan = plan_for(argv, world)
    runs = [measure(argv, world) for _ in range(repeats)]
    per_stage = world // plan.pp
    ratios = [plan.totals[r // per_stage] / m["peak"] for run in runs for r, m in enumerate(run)]
    top = max(range(world), key=lambda r: max(run[r]["peak"] for run in runs))
    peaks = [run[top]["peak"] for run in runs]
    between = [b for run in runs for b in run[top]["between_steps"][1:]]
    last = max(runs, key=lambda run: run[top]["peak"])[top]
    phase = "backward" if last["forward_backward"] >= last["after_backward"] else "after backward"
    acts = sum(plan.row("activations held (× in flight)").bytes) / max(1, sum(plan.totals))
    return {"plan": plan.totals[top // per_stage], "measured": (min(peaks), max(peaks)),
            "ratio": plan.totals[top // per_stage] / max(peaks),
            "worst": max(ratios, key=lambda x: abs(x - 1.0)), "activation_share": acts,
            "between": (min(between), max(between)), "phase": phase, "plan_obj": plan}


def script_flags(script: str) -> list:
    """The pretrain flags a Slurm script passes, read from its ``DRY_RUN=1`` srun line."""
    env = dict(os.environ, DRY_RUN="1", TOKENIZER_MODEL="tokenizer.model", PYTHON=sys.executable)
    for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NNODES"):
        env.pop(var, None)
    # Not check=True: the script's own plan exits non-zero when the recipe does not fit.
    out = subprocess.run(["bash", script], capture_output=True, text=True, env=env, cwd=ROOT).stdout
    line = next(ln for ln in out.splitlines() if "pretrain_alcot.py" in ln and "srun" in ln)
    words = shlex.split(line)
    return words[words.index("pretrain_alcot.py") + 1:]


def script_world(script: str) -> int:
    """``#SBATCH --nodes`` × ``#SBATCH --ntasks-per-node`` of a Slurm script."""
    with open(script) as fh:
        text = fh.read()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", text, re.M).group(1))
    per_node = int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)", text, re.M).group(1))
    return nodes * per_node


def _recipe_page(title: str, intro: str, variants, out: str) -> None:
    from megatron_alcot.arguments import parse_args
    from megatron_alcot.memory_plan import format_plan, plan_memory, validate_for_plan
    parts = [f"# {title}", "", intro, ""]
    summary = ["| variant | world | peak per GPU (GiB) | of 80 GiB | headroom |", "|---|---|---|---|---|"]
    tables = []
    for name, flags, world in variants:
        args = parse_args(list(flags))
        validate_for_plan(args, world)
        plan = plan_memory(args, world, 80.0, reserve_gib=2.0)
        summary.append(f"| {name} | {world} | {plan.peak_bytes / 2 ** 30:.1f} | "
                       f"{'fits' if plan.fits else 'does not fit'} | {100 * plan.headroom:.1f} % |")
        tables += [f"## {name}", "", "```", f"python tools/plan_memory.py <flags> --world-size {world} "
                   "--gpu-memory-gb 80", "", format_plan(plan), "```", ""]
    parts += summary + [""] + tables
    with atomic_output(out, "w") as fh:
        fh.write("\n".join(parts))
    print(f"wrote {out}")


def _variants(flags: list, world: int) -> list:
    """The script as it is, then the recompute and optimizer choices it does not make."""
    out = [("as the script runs it", flags, world)]
    if "--use-distributed-optimizer" not in flags:
        out.append(("with --use-distributed-optimizer (ZeRO-1)", flags + ["--use-distributed-optimizer"], world))
    else:
        plain = [f for f in flags if f != "--use-distributed-optimizer"]
        out.append(("plain DDP (without --use-distributed-optimizer)", plain, world))
    for granularity in ("selective", "full"):
        if _last(flags, "--recompute-granularity") != granularity:
            out.append((f"--recompute-granularity {granularity}",
                        flags + ["--recompute-granularity", granularity], world))
    micro = int(_last(flags, "--micro-batch-size") or 1)
    if micro > 1 and _last(flags, "--recompute-granularity") != "full":
        out.append((f"--micro-batch-size {micro // 2} and --recompute-granularity selective",
                    flags + ["--micro-batch-size", str(micro // 2), "--recompute-granularity", "selective"], world))
    return out


def _last(flags: list, name: str):
    """The value the parser keeps for ``name`` (the last one given), or None."""
    idx = [i for i, f in enumerate(flags) if f == name]
    return flags[idx[-1] + 1] if idx else None


def recipes() -> None:
    """docs/memory_plan_7b.md and docs/memory_plan_1.4b.md from slurm/pretrain_7b.sh and
    slurm/pretrain_1.4b.sh."""
    for size in ("7b", "1.4b"):
        script = os.path.join(ROOT, "slurm", f"pretrain_{size}.sh")
        flags, world = script_flags(script), script_world(script)
        _recipe_page(
            f"Memory plan: the {size.upper()} recipe (slurm/pretrain_{size}.sh)",
            f"Generated by `bench/bench_memory_plan.py --recipes` from the flags `slurm/pretrain_{size}.sh` "
            f"passes (read from its `DRY_RUN=1` srun line) on its {world} GPUs (`#SBATCH` nodes × tasks per "
            "node), each of 80 GiB with 2 GiB of runtime reserve; the first row is what `DRY_RUN=1` prints, "
            "the others change one choice. The accounting is `megatron_alcot/memory_plan.py`: parameters "
            "counted on meta-built stages, activations by the per-layer formula that "
            "docs/bench_memory_plan.md checks against measured peaks, every token taking all ℓmax + 1 "
            "laps. Attention on CUDA: FlexAttention over the lap mask (no dense mask). The measured check "
            "is fp32 on CPUs; the bf16 split used here (fp32 residual stream and norm statistics, bf16 "
            "matmul inputs and outputs, one bf16 copy of the matmul weights per step) follows the same "
            "terms and has not been measured on a GPU yet.",
            _variants(flags, world), os.path.join(ROOT, "docs", f"memory_plan_{size}.md"))


def _span(lo: float, hi: float) -> str:
    return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", choices=("all", "quick"), default="all")
    ap.add_argument("--recipes", action="store_true",
                    help="write docs/memory_plan_7b.md and docs/memory_plan_1.4b.md instead (no runs)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per row (default 3)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "bench_memory_plan.md"))
    opts = ap.parse_args(argv)
    if opts.recipes:
        recipes()
        return
    grid = [g for g in GRID if opts.rows == "all" or g[0] in QUICK]
    table = [f"| configuration | world | plan (MiB) | measured, {opts.repeats} runs (MiB) | plan / largest "
             "measured | worst rank, any run | peak in | live between iterations (MiB) | activations in plan |",
             "|---|---|---|---|---|---|---|---|---|"]
    worst = top_worst = 0.0
    spread, spread_row = 0.0, ""
    started = time.time()
    mib = float(2 ** 20)
    for label, world, extra in grid:
        flags = BASE + extra
        if "DP2" in label or "TP2" in label or "PP2" in label:
            flags = flags + ["--global-batch-size", str(2 * (2 if "DP2" in label else 1))]
        r = compare(flags, world, opts.repeats)
        worst = max(worst, abs(r["worst"] - 1.0))
        top_worst = max(top_worst, abs(r["ratio"] - 1.0))
        lo, hi = r["measured"]
        if hi - lo > spread:
            spread, spread_row = hi - lo, label
        b_lo, b_hi = r["between"]
        row = (f"| {label} | {world} | {r['plan'] / mib:.2f} | {_span(lo / mib, hi / mib)} | {r['ratio']:.3f} | "
               f"{r['worst']:.3f} | {r['phase']} | {_span(b_lo / mib, b_hi / mib)} | "
               f"{100 * r['activation_share']:.0f} % |")
        table.append(row)
        print(row, flush=True)
    text = "\n".join([
        "# Memory plan vs measured peak",
        "",
        f"Measured by `bench/bench_memory_plan.py --rows {opts.rows} --repeats {opts.repeats}` on "
        f"{hardware.describe_cpu()}, torch {torch.__version__}, gloo, one thread per rank, the cores "
        f"shared with other work ({time.time() - started:.0f} s in all).",
        "",
        "Each row trains the same model (4 layers, hidden 128, 4 heads, FFN 384, vocabulary 512, "
        "sequence 128, micro-batch 2, fp32, untied, ALCoT) for five iterations through "
        "`training.train.train`, "
        f"{opts.repeats} times. *measured* is the largest number of live CPU-allocator bytes during "
        "iterations 2 to 5 (Adam state exists, buffers are warm), counted from before the model is "
        "built, on the rank with the largest peak: the smallest and the largest over the runs. "
        "*plan* is `tools/plan_memory.py`'s total for that rank's stage with no runtime reserve, "
        "and *plan / largest measured* divides it by the largest run; *worst rank, any run* is the "
        "plan/peak ratio farthest from 1 over every rank of every run. *peak in* says whether the "
        "peak fell inside the forward-backward or after it (gradient reduction, optimizer step, "
        "parameter all-gather); *live between iterations* is that rank's live bytes as iterations "
        "2 to 5 start, over all runs (equal bounds: nothing is left behind from one iteration to the "
        "next); *activations in plan* is the activation share of the plan, so a row cannot agree "
        "through the parameter counts alone. Every token takes every lap here (the routers start at "
        "continue probability 0.9 and halting threshold 0.1), which is what the plan assumes. PP "
        "rows use one micro-batch, where GPipe and 1F1B hold the same.",
        "",
        "How it is counted: `torch.profiler` with `profile_memory`, and the CPU allocator told to "
        "count the allocations and frees of every thread (c10's `caffe2_report_cpu_memory_usage`, "
        "`bench/memory_timeline.py`); the live count is read at every allocation and free of the "
        "training thread. The profiler alone reports frees only on the threads it runs on: a "
        "tensor that the training thread allocates and a gloo worker thread frees (its work "
        "object holds the last reference after `wait()` has returned) would never be seen freed, "
        "and a sum of the profiler's events would drift upwards by whole buffers, more or less "
        "often from run to run. Counted this way, every rank of a stage and every run measure the "
        "same peak within a few KiB, and the live bytes between iterations stay the same.",
        "",
        "ZeRO-2 is planned as the rank's 1/DP gradient shard plus at most two staging buckets that "
        "exist only during the backward (one filling, one being reduce-scattered); with the default "
        "25 MiB buckets this model's gradients (3.8 MiB) are one bucket, the 0.5 MiB row has many. On "
        "CPUs the distributed optimizer's gloo reduce-scatter and all-gather allocate a copy of the "
        "whole bucket while they run; CPU plans count it under communication buffers (CUDA plans do "
        "not). When all of a stage's gradients are one bucket, the reduce-scatter starts after the "
        "backward, so the plan puts that copy next to the gradients and lap 0's boundary tensors "
        "only; with several buckets one may be in flight at the backward's peak, and the plan adds "
        "it there: an upper bound, which the 0.5 MiB row shows.",
        "",
        *table,
        "",
        f"Largest deviation over every rank of every run: {100 * worst:.1f} %; of the largest "
        f"measured peak of each row: {100 * top_worst:.1f} % (goal: within 10 %). The runs of one row "
        f"differ by at most {spread / mib:.2f} MiB ({spread_row or 'none'}): what remains timing-dependent "
        "is when gloo's worker thread releases a finished collective's tensors relative to the "
        "training thread's allocations. Under heavier load than this run, one test run of the DP 2 "
        "ZeRO-1 ℓ0 row measured more than 5 % away from its plan, and ten later runs did not: a "
        "gloo worker thread descheduled before it releases a finished collective's staging copy "
        "would keep that copy live into the next iteration, which the plan does not count.",
        "",
        "The row nearest the limit is PP 2 ℓ3 with full recompute, last stage (plan low by 7.6 %): "
        "at its peak, in the last lap's backward under the lap pipeline, the LM head's forward-made "
        "weight gradient and its backward's copy are still live, which the plan counts as released "
        "before the first recompute; the rest of the difference (about 1 MiB) is not accounted for "
        "yet.",
        "",
    ])
    with atomic_output(opts.out, "w") as fh:
        fh.write(text)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
