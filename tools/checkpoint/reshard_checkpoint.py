"""Rewrite a megatron_alcot checkpoint for another tensor/pipeline-parallel size (offline, CPU).

    python tools/checkpoint/reshard_checkpoint.py --load ckpts --save ckpts_tp1 \\
        --target-tensor-parallel-size 1 [--target-pipeline-parallel-size 2] [--ckpt-step 1000]

Online loading already reshards on the fly; this tool is for moving a checkpoint once (e.g. to
serve it at TP = 1, or to avoid every rank reading every shard). Model weights and Adam moments
are merged and re-cut; RNG states are not carried over.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron_alcot.checkpointing.metadata import CheckpointError  # noqa: E402
from megatron_alcot.checkpointing.reshard import reshard_checkpoint  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", required=True, help="checkpoint directory to read")
    ap.add_argument("--save", required=True, help="directory to write (must differ from --load)")
    ap.add_argument("--target-tensor-parallel-size", type=int, required=True)
    ap.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                    help="default: the checkpoint's")
    ap.add_argument("--ckpt-step", type=int, default=None, help="iteration (default: latest)")
    args = ap.parse_args(argv)
    if os.path.abspath(args.load) == os.path.abspath(args.save):
        ap.error("--save must differ from --load (the source stays untouched)")
    try:
        out = reshard_checkpoint(args.load, args.save, args.target_tensor_parallel_size,
                                 args.target_pipeline_parallel_size, args.ckpt_step)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
