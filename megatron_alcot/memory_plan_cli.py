"""Will this training run fit? A per-rank memory plan, printed before any compute.

    python tools/plan_memory.py <pretrain_alcot.py flags> --world-size 32 --gpu-memory-gb 80
    SLURM_NTASKS=32 python tools/plan_memory.py <flags> --gpu-memory-gb 80     # world from Slurm

Takes exactly ``pretrain_alcot.py``'s flags (the same parser; the same validation, except that the
data files and the tokenizer file need not exist here) plus the flags below. Prints one table per
rank (a column per pipeline stage, in GiB), the peak against the budget with the headroom, and one
JSON line last. Exit status: 0 fits, 1 does not fit (``--no-fail``: 0 anyway), 2 bad configuration.
The accounting is ``megatron_alcot.memory_plan`` (docs/bench_memory_plan.md compares it with
measured peaks); ``tools/plan_memory.py`` is this module's command line.
"""
from __future__ import annotations

import argparse
import sys

EXIT_FITS, EXIT_TOO_BIG, EXIT_CONFIG = 0, 1, 2


def _tool_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="plan_memory.py", add_help=False, allow_abbrev=False)
    ap.add_argument("--world-size", type=int, default=None,
                    help="ranks in the job (default: SLURM_NTASKS, or SLURM_NNODES × SLURM_NTASKS_PER_NODE)")
    ap.add_argument("--gpu-memory-gb", type=float, default=None,
                    help="memory of one device in GiB as nvidia-smi shows it (80 for an 80 GB H100/A100)")
    ap.add_argument("--runtime-reserve-gb", type=float, default=2.0,
                    help="GiB set aside for the CUDA context, library workspaces and NCCL (default 2)")
    ap.add_argument("--plan-vocab-size", type=int, default=None,
                    help="vocabulary size when --tokenizer-model is not readable here (Llama2Tokenizer: "
                         "32000 without it)")
    ap.add_argument("--plan-device", choices=("cuda", "cpu"), default="cuda",
                    help="where the run will train (default cuda); decides the attention core auto picks")
    ap.add_argument("--no-fail", action="store_true", help="exit 0 even when the plan does not fit")
    return ap


def main(argv=None) -> int:
    from megatron_alcot.arguments import build_parser, parse_args
    from megatron_alcot.config import ConfigError
    from megatron_alcot.memory_plan import format_plan, plan_memory, validate_for_plan, world_size_from_slurm

    argv = list(sys.argv[1:] if argv is None else argv)
    tool = _tool_parser()
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n")
        tool.print_help()
        print("\nand every flag of pretrain_alcot.py:\n")
        build_parser().print_help()
        return 0
    opts, rest = tool.parse_known_args(argv)
    try:
        world = opts.world_size if opts.world_size is not None else world_size_from_slurm()
        if world is None:
            raise ConfigError("give --world-size N (or run where SLURM_NTASKS or SLURM_NNODES and "
                              "SLURM_NTASKS_PER_NODE are set)")
        if opts.gpu_memory_gb is not None and opts.gpu_memory_gb <= 0:
            raise ConfigError(f"--gpu-memory-gb must be positive, got {opts.gpu_memory_gb}")
        if opts.runtime_reserve_gb < 0:
            raise ConfigError(f"--runtime-reserve-gb must be >= 0, got {opts.runtime_reserve_gb}")
        args = parse_args(rest)
        validate_for_plan(args, world, opts.plan_vocab_size)
        plan = plan_memory(args, world, opts.gpu_memory_gb, reserve_gib=opts.runtime_reserve_gb,
                           device=opts.plan_device)
    except ConfigError as exc:
        print(f"plan_memory.py: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    print(format_plan(plan))
    print(plan.to_json(), flush=True)
    if not plan.fits:
        print(f"plan_memory.py: the plan needs {plan.peak_bytes / 2 ** 30:.2f} GiB per rank, more than "
              f"--gpu-memory-gb {opts.gpu_memory_gb}: add --recompute-granularity full, "
              "--use-distributed-optimizer, a larger --tensor-model-parallel-size or a smaller "
              "--micro-batch-size", file=sys.stderr, flush=True)
        return EXIT_FITS if opts.no_fail else EXIT_TOO_BIG
    return EXIT_FITS
