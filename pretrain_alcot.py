"""Pretrain a LLaMA model with adaptive latent chain-of-thought, Megatron-LM style.

    torchrun --nproc-per-node 8 pretrain_alcot.py --num-layers 24 --hidden-size 1024 \
        --num-attention-heads 16 --seq-length 2048 --micro-batch-size 4 --global-batch-size 256 \
        --train-iters 50000 --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --bf16 \
        --data-path data/corpus_text_document --tokenizer-type SentencePieceTokenizer \
        --tokenizer-model tokenizer.model --latent-method alcot --latent-max-steps 3 --save ckpts

    python pretrain_alcot.py --help          # every flag

In Python: ``main(argv) -> exit code`` (0 done or stopped by SIGTERM/duration/interval after
saving, 2 bad configuration, 3 too many NaN/Inf steps in a row). The flags become a ``RunConfig``
here (``arguments.parse_args``); ``training.train.train(config)`` runs it.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_alcot.config import ConfigError

EXIT_OK, EXIT_CONFIG, EXIT_NAN = 0, 2, 3


def main(argv: Optional[Sequence[str]] = None, **train_kwargs) -> int:
    from megatron_alcot.arguments import parse_args
    from megatron_alcot.training.train import NanSkipLimitError, train
    try:
        train(parse_args(argv), **train_kwargs)
    except ConfigError as exc:
        print(f"pretrain_alcot.py: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except NanSkipLimitError as exc:
        print(f"pretrain_alcot.py: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_NAN
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
