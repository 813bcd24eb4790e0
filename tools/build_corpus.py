"""Write the embedded English corpus (Python's help topics and standard-library docstrings) as JSONL.

    python tools/build_corpus.py --output corpus.jsonl        # ~1.7 MB, same bytes on every run

See ``megatron_alcot/data/corpus.py`` for what goes in and what determinism holds.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_alcot.data.corpus import MIN_CHARS, write_corpus  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="JSONL file to write (atomically)")
    p.add_argument("--min-chars", type=int, default=MIN_CHARS, help="drop texts shorter than this")
    args = p.parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    try:
        stats = write_corpus(args.output, args.min_chars)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {stats.documents} documents, {stats.bytes / 1e6:.2f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
