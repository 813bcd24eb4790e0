"""Will this training run fit? A per-rank memory plan, printed before any compute.

    python tools/plan_memory.py <pretrain_alcot.py flags> --world-size 32 --gpu-memory-gb 80

The command line of ``megatron_alcot.memory_plan_cli``.
"""
import os
import sys

# A checkout runs this without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_alcot.memory_plan_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
