"""Turn one chunk of JSON lines into token arrays ready for ``IndexedDatasetBuilder.add_documents``.

Runs inside preprocessing workers: each call parses, validates and tokenizes a whole chunk with
one batch call per JSON key and hands back numpy arrays (never per-token Python lists).

    >>> enc = ChunkEncoder(TokenizerSpec("NullTokenizer", None, 100), ["text"], append_eod=True,
    ...                    dtype=numpy.uint16, skip_bad_lines=False)
    >>> result = enc(chunk)          # ChunkResult; result.fatal holds 'file:line: what' if a line is bad
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy

from megatron_alcot.data._jsonl_chunks import Chunk
from megatron_alcot.data.tokenizers import Tokenizer, TokenizerError, build_tokenizer

MAX_MESSAGES_PER_CHUNK = 5


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker needs to rebuild the tokenizer (workers never receive the object itself)."""

    tokenizer_type: str
    tokenizer_model: Optional[str]
    vocab_size: Optional[int]

    def build(self) -> Tokenizer:
        return build_tokenizer(self.tokenizer_type, self.tokenizer_model, self.vocab_size)


@dataclass
class KeyPart:
    tokens: numpy.ndarray                      # all kept sequences back to back, dataset dtype
    sequence_lengths: numpy.ndarray            # int64, one per sequence
    sequences_per_document: Optional[numpy.ndarray]  # None: one sequence per document
    empty_documents: int = 0


@dataclass
class ChunkResult:
    index: int
    parts: Dict[str, KeyPart] = field(default_factory=dict)
    lines: int = 0              # non-blank lines read
    documents: int = 0          # lines that parsed (a document per JSON key)
    blank_lines: int = 0
    bad_lines: int = 0
    bad_messages: List[str] = field(default_factory=list)
    text_bytes: int = 0
    raw_position: int = 0
    fatal: Optional[str] = None  # first bad line when bad lines are not skipped; or a worker failure
    fatal_is_bad_line: bool = False  # True: --skip-bad-lines would have skipped it


class BadLine(ValueError):
    pass


def parse_line(raw: bytes, keys: List[str]) -> list:
    """The values of ``keys`` in one JSON line (a string or a list of strings each); raises BadLine."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
                      "re-encode the file as UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise BadLine(f"expected a JSON object per line, got a JSON {type(obj).__name__}")
    values = []
    for key in keys:
        if key not in obj:
            present = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
            raise BadLine(f"missing key {key!r} (keys present: {present}); choose the keys with --json-keys")
        value = obj[key]
        if isinstance(value, str):
            values.append(value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            values.append(value)
        else:
            raise BadLine(f"key {key!r} holds a JSON {type(value).__name__}; expected a string "
                          "(or a list of strings, one per sentence)")
    return values


class ChunkEncoder:
    def __init__(self, spec: TokenizerSpec, keys: List[str], append_eod: bool, dtype,
                 skip_bad_lines: bool, tokenizer: Optional[Tokenizer] = None) -> None:
        self.tokenizer = tokenizer if tokenizer is not None else spec.build()
        self.keys = list(keys)
        self.append_eod = append_eod
        self.eod = self.tokenizer.eod if append_eod else None
        self.dtype = numpy.dtype(dtype)
        self.skip_bad_lines = skip_bad_lines

    def __call__(self, chunk: Chunk) -> ChunkResult:
        result = ChunkResult(chunk.index, text_bytes=len(chunk.data), raw_position=chunk.raw_position)
        lines = chunk.data.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        texts: Dict[str, list] = {k: [] for k in self.keys}
        line_of_text: Dict[str, list] = {k: [] for k in self.keys}
        counts: Dict[str, list] = {k: [] for k in self.keys}
        split: Dict[str, bool] = {k: False for k in self.keys}
        for offset, raw in enumerate(lines):
            if not raw or raw.isspace():
                result.blank_lines += 1
                continue
            result.lines += 1
            try:
                values = parse_line(raw, self.keys)
            except BadLine as e:
                message = f"{chunk.path}:{chunk.first_line + offset}: {e}"
                if not self.skip_bad_lines:
                    result.fatal, result.fatal_is_bad_line = message, True
                    return result
                result.bad_lines += 1
                if len(result.bad_messages) < MAX_MESSAGES_PER_CHUNK:
                    result.bad_messages.append(message)
                continue
            result.documents += 1
            for key, value in zip(self.keys, values):
                if isinstance(value, str):
                    texts[key].append(value)
                    counts[key].append(1)
                else:
                    texts[key].extend(value)
                    counts[key].append(len(value))
                    split[key] = True
                line_of_text[key].extend([chunk.first_line + offset] * counts[key][-1])
        for key in self.keys:
            try:
                result.parts[key] = self._encode(texts[key], counts[key] if split[key] else None)
            except TokenizerError:
                result.fatal = self._locate_tokenizer_error(chunk.path, key, texts[key], line_of_text[key])
                return result
        return result

    def _locate_tokenizer_error(self, path: str, key: str, texts: list, lines: list) -> str:
        for text, line in zip(texts, lines):
            try:
                self.tokenizer.tokenize(text)
            except TokenizerError as e:
                return f"{path}:{line}: key {key!r}: {e}"
        return f"{path}:{lines[0] if lines else '?'}: key {key!r}: the tokenizer failed on this chunk"

    def _encode(self, texts: list, counts: Optional[list]) -> KeyPart:
        arrays = self.tokenizer.tokenize_batch_arrays(texts, num_threads=1) if texts else []
        if counts is None:
            return self._one_sequence_per_document(arrays)
        pieces, lengths, per_doc, empty, pos = [], [], [], 0, 0
        for count in counts:
            sentences = [a for a in arrays[pos:pos + count] if a.size]
            pos += count
            if not sentences:
                empty += 1
                continue
            if self.append_eod:
                sentences[-1] = numpy.append(sentences[-1], self.eod)
            pieces.extend(sentences)
            lengths.extend(a.size for a in sentences)
            per_doc.append(len(sentences))
        return KeyPart(self._concat(pieces), numpy.asarray(lengths, dtype=numpy.int64),
                       numpy.asarray(per_doc, dtype=numpy.int64), empty)

    def _one_sequence_per_document(self, arrays: list) -> KeyPart:
        lengths = numpy.fromiter((a.size for a in arrays), dtype=numpy.int64, count=len(arrays))
        kept = lengths > 0
        empty = int(lengths.size - kept.sum())
        if empty:
            arrays = [a for a in arrays if a.size]
            lengths = lengths[kept]
        if self.append_eod and arrays:
            eod = numpy.asarray([self.eod], dtype=arrays[0].dtype)
            pieces = [None] * (2 * len(arrays))
            pieces[0::2] = arrays
            pieces[1::2] = [eod] * len(arrays)
            arrays = pieces
            lengths = lengths + 1
        return KeyPart(self._concat(arrays), lengths, None, empty)

    def _concat(self, pieces: list) -> numpy.ndarray:
        if not pieces:
            return numpy.empty(0, dtype=self.dtype)
        tokens = numpy.concatenate(pieces)
        if tokens.dtype != self.dtype:
            if self.dtype.kind == "u" and tokens.size and (int(tokens.max()) > numpy.iinfo(self.dtype).max
                                                          or int(tokens.min()) < 0):
                raise ValueError(f"token ids outside 0..{numpy.iinfo(self.dtype).max} for dtype {self.dtype}")
            tokens = tokens.astype(self.dtype)
        return tokens


def worker_main(spec: TokenizerSpec, keys, append_eod, dtype, skip_bad_lines, tasks, results) -> None:
    """Process loop of a preprocessing worker: chunks in from ``tasks`` until None, results out."""
    import signal
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler: terminate() must end us
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; workers are the parallelism
    try:
        encoder = ChunkEncoder(spec, keys, append_eod, dtype, skip_bad_lines)
    except Exception:
        results.put(ChunkResult(-1, fatal="worker start-up failed:\n" + traceback.format_exc()))
        return
    while True:
        chunk = tasks.get()
        if chunk is None:
            return
        try:
            results.put(encoder(chunk))
        except Exception:
            results.put(ChunkResult(chunk.index, fatal=f"{chunk.path}:{chunk.first_line}: tokenizing the chunk "
                                    "starting at this line failed:\n" + traceback.format_exc()))
