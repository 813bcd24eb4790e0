"""Stream JSON-Lines inputs (plain, ``.gz``, ``.zst``) as line-aligned byte chunks.

    >>> paths = expand_inputs(["data/*.jsonl.gz", "extra.jsonl"])
    >>> for chunk in iter_chunks(paths, chunk_bytes=1 << 20):
    ...     chunk.path, chunk.first_line, len(chunk.data), chunk.raw_position

A chunk holds whole lines only (a line longer than ``chunk_bytes`` makes a bigger chunk) and knows
the file and line number it starts at, so per-line errors can be reported as ``file:line``.
"""
from __future__ import annotations

import glob
import gzip
import io
import os
import zlib
from dataclasses import dataclass
from typing import Iterator, List, Sequence


class InputError(ValueError):
    """An input file is missing, unreadable or corrupted; the message names it."""


@dataclass
class Chunk:
    index: int          # position of the chunk in the whole input, from 0
    path: str           # the file the lines come from
    first_line: int     # 1-based line number of the chunk's first line in that file
    data: bytes         # whole lines, each ending in b"\n" except maybe the file's last one
    raw_position: int   # bytes of all input files consumed (on disk, i.e. compressed) so far


def expand_inputs(patterns: Sequence[str], flag: str = "--input") -> List[str]:
    """Files named by paths or glob patterns, in the order given (each glob sorted), no repeats."""
    paths: List[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            raise InputError(f"{flag} {pattern}: is a directory; give JSONL files or a glob such as "
                             f"'{os.path.join(pattern, '*.jsonl')}'")
        matches = [pattern] if os.path.exists(pattern) else sorted(glob.glob(pattern))
        matches = [m for m in matches if not os.path.isdir(m)]
        if not matches:
            raise InputError(f"{flag} {pattern}: no such file (and no file matches it as a glob)")
        for m in matches:
            if m not in paths:
                paths.append(m)
    return paths


def total_raw_size(paths: Sequence[str]) -> int:
    """Sum of the on-disk sizes of regular files (pipes count 0: progress shows no ETA)."""
    total = 0
    for p in paths:
        try:
            if os.path.isfile(p):
                total += os.path.getsize(p)
        except OSError:
            pass
    return total


def _open_decoded(path: str, raw) -> io.RawIOBase:
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if path.endswith((".zst", ".zstd")):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_size=1 << 20)
    return raw


def iter_chunks(paths: Sequence[str], chunk_bytes: int = 1 << 20) -> Iterator[Chunk]:
    """Yield line-aligned chunks of every file in order; raises InputError naming a bad file."""
    index = 0
    consumed_before = 0
    for path in paths:
        try:
            raw = open(path, "rb")
        except OSError as e:
            raise InputError(f"{path}: cannot open input ({e.strerror})") from None
        with raw:
            stream = _open_decoded(path, raw)
            pending = b""
            line_no = 1
            while True:
                try:
                    block = stream.read(chunk_bytes)
                except (OSError, EOFError, zlib.error) as e:
                    raise InputError(f"{path}: cannot decompress input ({e}); the file is corrupted or "
                                     "its extension does not match its format") from None
                except Exception as e:  # zstandard.ZstdError does not derive from OSError
                    raise InputError(f"{path}: cannot decompress input ({e}); the file is corrupted or "
                                     "its extension does not match its format") from None
                if not block:
                    break
                pending += block
                if len(pending) < chunk_bytes:
                    continue
                cut = pending.rfind(b"\n")
                if cut < 0:
                    continue
                data, pending = pending[: cut + 1], pending[cut + 1:]
                yield Chunk(index, path, line_no, data, consumed_before + _tell(raw))
                index += 1
                line_no += data.count(b"\n")
            if pending:
                yield Chunk(index, path, line_no, pending, consumed_before + _tell(raw))
                index += 1
            consumed_before += _tell(raw)


def _tell(raw) -> int:
    try:
        return raw.tell()
    except OSError:  # pipes
        return 0
