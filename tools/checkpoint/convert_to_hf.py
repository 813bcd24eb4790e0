"""Export a native megatron_alcot checkpoint (any TP/PP) to a Hugging Face directory.

The command line of ``megatron_alcot.hf.convert_to_hf``; ``--help`` lists the flags. From Python,
call that module's functions.
"""
import os
import sys

# A checkout runs this without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_alcot.hf.convert_to_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
