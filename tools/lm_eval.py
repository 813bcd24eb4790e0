"""Run lm-evaluation-harness on native checkpoints: ``--model megatron_alcot --model_args load=CKPT``.

    python tools/lm_eval.py --model megatron_alcot --model_args load=ckpts --tasks lambada_openai

The command line of ``megatron_alcot.evaluation.lm_eval_cli``: lm-eval's own CLI, with the adapter
registered first; every argument is lm-eval's.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":
    # Run as a script, this folder is on sys.path and this file would shadow the lm_eval package.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
# A checkout runs this without installing the package.
sys.path.insert(0, os.path.dirname(HERE))

from megatron_alcot.evaluation.lm_eval_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
