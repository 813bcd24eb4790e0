"""JSONL -> Megatron ``.bin/.idx``: the engine behind ``tools/preprocess_data.py``.

    >>> opts = PreprocessOptions(inputs=["corpus.jsonl"], output_prefix="data/corpus",
    ...                          tokenizer_type="Llama2Tokenizer", tokenizer_model="tok.model",
    ...                          append_eod=True, workers=4)
    >>> summary = preprocess(opts)     # writes data/corpus_text_document.{bin,idx}; PreprocessError on bad input

Shape: the main process reads the inputs as line-aligned byte chunks and hands them to
``workers`` processes; each worker parses, checks and tokenizes a whole chunk with one batch call
and returns numpy arrays; the main process appends the results in input order to one builder per
JSON key. So the output does not depend on ``workers``, memory is bounded by the chunks in flight
(plus 20 bytes of index per document, spilled to disk), and the outputs appear under their final
names only after everything succeeded.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, TextIO

import numpy

from megatron_alcot.data._chunk_encoder import ChunkEncoder, ChunkResult, TokenizerSpec, worker_main
from megatron_alcot.data._jsonl_chunks import InputError, expand_inputs, iter_chunks, total_raw_size
from megatron_alcot.data.indexed_dataset import (IndexedDatasetBuilder, get_bin_path, get_idx_path,
                                                 optimal_dtype)
from megatron_alcot.data.tokenizers import TokenizerError


class PreprocessError(Exception):
    """Bad input or flags; the message says where and what to do. The tool exits with code 2."""


@dataclass
class PreprocessOptions:
    inputs: List[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: Optional[str] = None
    vocab_size: Optional[int] = None
    json_keys: List[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    workers: int = 1
    log_interval: int = 1000
    skip_bad_lines: bool = False
    chunk_bytes: int = 1 << 20


@dataclass
class PreprocessSummary:
    outputs: Dict[str, str]             # json key -> dataset prefix written
    documents: Dict[str, int]           # json key -> documents written
    tokens: Dict[str, int]
    empty_documents: Dict[str, int]
    lines: int = 0
    bad_lines: int = 0
    blank_lines: int = 0
    text_bytes: int = 0
    raw_position: int = 0               # on-disk input bytes consumed (for the ETA)
    seconds: float = 0.0
    dtype: str = ""
    bad_examples: List[str] = field(default_factory=list)


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: ``{output_prefix}_{key}_document`` (the path --data-path takes)."""
    return f"{output_prefix}_{key}_document"


def preprocess(opts: PreprocessOptions, log: Optional[TextIO] = None) -> PreprocessSummary:
    """Run the whole conversion; raises PreprocessError (nothing written) on bad input."""
    if opts.workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {opts.workers}")
    if not opts.json_keys:
        raise PreprocessError("--json-keys needs at least one key")
    spec = TokenizerSpec(opts.tokenizer_type, opts.tokenizer_model, opts.vocab_size)
    try:
        tokenizer = spec.build()
        if opts.append_eod:
            tokenizer.eod
    except TokenizerError as e:
        raise PreprocessError(str(e)) from None
    dtype = optimal_dtype(tokenizer.vocab_size)
    try:
        paths = expand_inputs(opts.inputs)
    except InputError as e:
        raise PreprocessError(str(e)) from None
    out_dir = os.path.dirname(os.path.abspath(opts.output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    prefixes = {k: output_prefix_for(opts.output_prefix, k) for k in opts.json_keys}
    summary = PreprocessSummary(outputs=prefixes, documents=dict.fromkeys(prefixes, 0),
                                tokens=dict.fromkeys(prefixes, 0), empty_documents=dict.fromkeys(prefixes, 0),
                                dtype=numpy.dtype(dtype).name)
    progress = _Progress(log or sys.stderr, opts.log_interval, total_raw_size(paths))
    builders: Dict[str, IndexedDatasetBuilder] = {}
    previous_sigterm = _raise_on_sigterm()
    try:
        for key, prefix in prefixes.items():
            builders[key] = IndexedDatasetBuilder(get_bin_path(prefix), dtype)
        chunks = iter_chunks(paths, opts.chunk_bytes)
        if opts.workers == 1:
            encoder = ChunkEncoder(spec, opts.json_keys, opts.append_eod, dtype, opts.skip_bad_lines, tokenizer)
            results = (encoder(chunk) for chunk in chunks)
        else:
            results = _pooled(chunks, opts.workers,
                              (spec, opts.json_keys, opts.append_eod, dtype, opts.skip_bad_lines))
        try:
            for result in results:
                _absorb(result, builders, summary, opts)
                progress.update(summary)
        except InputError as e:
            raise PreprocessError(str(e)) from None
        finally:
            if hasattr(results, "close"):
                results.close()
        _check_not_empty(summary, paths)
        for key, prefix in prefixes.items():
            builders[key].finalize(get_idx_path(prefix))
    finally:
        for builder in builders.values():
            builder.abort()
        signal.signal(signal.SIGTERM, previous_sigterm)
    summary.seconds = progress.elapsed()
    return summary


def _absorb(result: ChunkResult, builders, summary: PreprocessSummary, opts: PreprocessOptions) -> None:
    if result.fatal:
        hint = ""
        if result.fatal_is_bad_line:
            hint = "\nFix the line, or pass --skip-bad-lines to skip and count bad lines."
        raise PreprocessError(result.fatal + hint)
    summary.lines += result.lines
    summary.bad_lines += result.bad_lines
    summary.blank_lines += result.blank_lines
    summary.text_bytes += result.text_bytes
    summary.raw_position = max(summary.raw_position, result.raw_position)
    room = 10 - len(summary.bad_examples)
    if room > 0:
        summary.bad_examples.extend(result.bad_messages[:room])
    for key, part in result.parts.items():
        builders[key].add_documents(part.tokens, part.sequence_lengths, part.sequences_per_document)
        n_docs = part.sequence_lengths.size if part.sequences_per_document is None else part.sequences_per_document.size
        summary.documents[key] += n_docs
        summary.tokens[key] += int(part.tokens.size)
        summary.empty_documents[key] += part.empty_documents


def _check_not_empty(summary: PreprocessSummary, paths: List[str]) -> None:
    if summary.lines == 0:
        raise PreprocessError(f"--input {' '.join(paths)}: no JSON lines found (the input is empty); "
                              "nothing to preprocess")
    if not any(summary.documents.values()):
        raise PreprocessError(
            f"no document produced any tokens ({summary.lines} lines read, {summary.bad_lines} bad, "
            f"empty documents per key: {summary.empty_documents}); check --json-keys and the input")


def _raise_on_sigterm():
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return signal.getsignal(signal.SIGTERM)


# ----------------------------------------------------------------------------------------- workers
def _pooled(chunks: Iterator, workers: int, encoder_args: tuple) -> Iterator[ChunkResult]:
    """Encode chunks on ``workers`` processes; yields results in input order, at most 2N+1 in flight."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    tasks, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=worker_main, args=(*encoder_args, tasks, results), daemon=True)
             for _ in range(workers)]
    for p in procs:
        p.start()
    clean_exit = False
    try:
        waiting: Dict[int, ChunkResult] = {}
        next_index, in_flight, exhausted = 0, 0, False
        while True:
            while not exhausted and in_flight < 2 * workers + 1:
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                    break
                tasks.put(chunk)
                in_flight += 1
            if in_flight == 0:
                break
            result = _next_result(results, procs)
            if result.index < 0:  # a worker could not start: report it at once
                yield result
                return
            in_flight -= 1
            waiting[result.index] = result
            while next_index in waiting:
                yield waiting.pop(next_index)
                next_index += 1
        clean_exit = True
    finally:
        if clean_exit:
            for _ in procs:
                tasks.put(None)
            for p in procs:
                p.join(timeout=30)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        tasks.cancel_join_thread()
        results.cancel_join_thread()


def _next_result(results, procs) -> ChunkResult:
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise PreprocessError(f"a preprocessing worker died (exit code {dead[0].exitcode}); "
                                      "if it was killed for memory, use fewer --workers")


# ---------------------------------------------------------------------------------------- progress
class _Progress:
    def __init__(self, log: TextIO, interval: int, total_raw_bytes: int) -> None:
        self.log, self.interval, self.total = log, max(1, interval), total_raw_bytes
        self.start = time.monotonic()
        self.next_report = self.interval

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def update(self, summary: PreprocessSummary) -> None:
        if summary.lines < self.next_report:
            return
        self.next_report = (summary.lines // self.interval + 1) * self.interval
        elapsed = max(self.elapsed(), 1e-9)
        mb = summary.text_bytes / 1e6
        line = (f"processed {summary.lines} documents ({summary.lines / elapsed:.0f} docs/s, "
                f"{mb / elapsed:.2f} MB/s, {mb:.1f} MB)")
        if self.total and summary.raw_position:
            done = min(summary.raw_position / self.total, 1.0)
            eta = elapsed * (1.0 - done) / max(done, 1e-9)
            line += f", {100 * done:.0f}% of input, ETA {_duration(eta)}"
        self.log.write(line + "\n")
        self.log.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_summary(summary: PreprocessSummary) -> str:
    """Human-readable end-of-run report."""
    rows = []
    for key, prefix in summary.outputs.items():
        rows.append(f"wrote {prefix}.{{bin,idx}}: {summary.documents[key]} documents, {summary.tokens[key]} "
                    f"tokens ({summary.dtype}), {summary.empty_documents[key]} empty documents skipped")
    mb = summary.text_bytes / 1e6
    rows.append(f"read {summary.lines} lines ({mb:.1f} MB) in {summary.seconds:.1f} s "
                f"({mb / max(summary.seconds, 1e-9):.2f} MB/s); bad lines skipped: {summary.bad_lines}; "
                f"blank lines: {summary.blank_lines}")
    for example in summary.bad_examples:
        rows.append(f"  skipped {example}")
    return "\n".join(rows)
