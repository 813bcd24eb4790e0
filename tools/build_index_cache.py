"""Pre-build the dataset index caches on a CPU node, with the same flags as the training run.

The command line of ``megatron_alcot.data.build_index_cache``; ``--help`` lists the flags. From Python,
call that module's functions.
"""
import os
import sys

# A checkout runs this without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_alcot.data.build_index_cache import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
