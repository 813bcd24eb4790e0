"""Generate text and show how many latent steps each generated token used.

The command line of ``megatron_alcot.evaluation.generate``; ``--help`` lists the flags. From Python,
call that module's functions.
"""
import os
import sys

# A checkout runs this without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_alcot.evaluation.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
