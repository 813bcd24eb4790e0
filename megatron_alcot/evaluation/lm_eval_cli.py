"""lm-evaluation-harness's own command line, with the ``megatron_alcot`` model registered first.

    python tools/lm_eval.py --model megatron_alcot --model_args load=ckpts,max_length=2048 \\
        --tasks lambada_openai,hellaswag --batch_size 1 --output_path lm_eval_out

Every argument goes unchanged to lm-eval's CLI (``lm_eval --help`` lists them); the only difference
from running ``lm_eval`` itself is that the adapter in ``lm_eval_adapter.py`` is imported, and so
registered, before the CLI looks the model name up. The model arguments are those of
:class:`~megatron_alcot.evaluation.lm_eval_adapter.MegatronAlcotLM`.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run lm-eval's CLI on ``argv`` (default ``sys.argv[1:]``); returns its exit code."""
    import megatron_alcot.evaluation.lm_eval_adapter  # noqa: F401 - registers "megatron_alcot"
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]          # lm-eval's CLI parses sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
