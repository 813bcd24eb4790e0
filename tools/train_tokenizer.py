"""Train a LLaMA-layout SentencePiece BPE tokenizer on JSON Lines.

The command line of ``megatron_alcot.data.tokenizer_training``; ``--help`` lists the flags. From Python,
call that module's functions.
"""
import os
import sys

# A checkout runs this without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_alcot.data.tokenizer_training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
