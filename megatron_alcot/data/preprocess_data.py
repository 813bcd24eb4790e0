"""Tokenize JSON Lines into Megatron's ``.bin/.idx`` format (same flags as Megatron-LM's tool).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --append-eod --workers 8
    # -> data/corpus_text_document.bin / .idx   (pass data/corpus_text_document to --data-path)

``--input`` takes files, globs (quote them) or several of each; ``.gz`` and ``.zst`` are read as
compressed. Documents keep their input order whatever ``--workers`` is. A bad line (malformed
JSON, missing key, not UTF-8) stops the run with its ``file:line`` and exit code 2, or is skipped
and counted with ``--skip-bad-lines``. Outputs appear only when the run succeeds.
"""
from __future__ import annotations

import argparse
import os
import sys


from megatron_alcot.data._preprocess import (PreprocessError, PreprocessOptions, format_summary,
                                             preprocess)
from megatron_alcot.data.tokenizers import TOKENIZER_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True,
                   help="JSONL file(s) or glob(s); .gz and .zst are decompressed on the fly")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys to extract from each JSON object (one dataset per key); default: text")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed lines instead of stopping with exit code 2")
    g.add_argument("--split-sentences", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--keep-newlines", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="accepted for compatibility: documents always keep their input order")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES, metavar="TYPE",
                   help=f"one of {', '.join(TOKENIZER_TYPES)}")
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model, or tokenizer.json / its directory for HuggingFaceTokenizer")
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (NullTokenizer)")
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document id to every non-empty document (needed for GPT/LLaMA)")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="writes {prefix}_{key}_document.bin/.idx for each --json-keys key")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    g.add_argument("--partitions", type=int, default=1,
                   help="accepted for compatibility; --workers alone sets the parallelism")
    g.add_argument("--log-interval", type=int, default=1000, help="progress line every N documents")
    g.add_argument("--chunk-bytes", type=int, default=1 << 20,
                   help="input bytes handed to a worker at a time (default 1 MiB)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.split_sentences or args.keep_newlines:
        print("error: --split-sentences/--keep-newlines are not supported (they need NLTK punkt); give each "
              "sentence as an element of a JSON list instead, e.g. {\"text\": [\"One.\", \"Two.\"]}", file=sys.stderr)
        return 2
    if args.partitions < 1 or args.workers % args.partitions:
        print(f"error: --workers {args.workers} must be a multiple of --partitions {args.partitions}",
              file=sys.stderr)
        return 2
    opts = PreprocessOptions(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size, json_keys=args.json_keys,
        append_eod=args.append_eod, workers=args.workers, log_interval=args.log_interval,
        skip_bad_lines=args.skip_bad_lines, chunk_bytes=args.chunk_bytes)
    try:
        summary = preprocess(opts)
    except PreprocessError as e:
        print(f"error: {e}", file=sys.stderr)
        print("nothing was written under the output names", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written under the output names", file=sys.stderr)
        return 130
    print(format_summary(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
