"""Train a LLaMA-layout SentencePiece BPE tokenizer on JSON Lines.

    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 8000 --output-prefix out/tok
    # -> out/tok.model and out/tok.vocab; use with --tokenizer-type Llama2Tokenizer --tokenizer-model out/tok.model

Layout: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no pad, byte fallback (``<0x00>``..``<0xFF>`` at 3..258),
digits split, text kept verbatim (identity normalization, whitespace preserved).

Each non-empty line of each document is one training sentence. Determinism: the sentences are
read in input order, at most ``--input-sentence-size`` of them are sampled with a fixed seed
(``--seed``), and training runs on ``--num-threads`` threads (1 by default); the same input, flags
and sentencepiece version give a byte-identical ``.model``.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Iterator, List


from megatron_alcot.utils.atomic import atomic_output
from megatron_alcot.data._chunk_encoder import BadLine, parse_line
from megatron_alcot.data._jsonl_chunks import InputError, expand_inputs, iter_chunks

MAX_SENTENCE_BYTES = 16384


class TrainTokenizerError(Exception):
    pass


def iter_sentences(paths: List[str], keys: List[str], skip_bad_lines: bool) -> Iterator[str]:
    for chunk in iter_chunks(paths):
        for offset, raw in enumerate(chunk.data.split(b"\n")):
            if not raw.strip():
                continue
            try:
                values = parse_line(raw, keys)
            except BadLine as e:
                if skip_bad_lines:
                    continue
                raise TrainTokenizerError(f"{chunk.path}:{chunk.first_line + offset}: {e}\n"
                                          "Fix the line, or pass --skip-bad-lines.") from None
            for value in values:
                for text in ([value] if isinstance(value, str) else value):
                    for line in text.split("\n"):
                        if line.strip() and len(line.encode("utf-8")) <= MAX_SENTENCE_BYTES:
                            yield line


def train(input_patterns: List[str], output_prefix: str, vocab_size: int, json_keys=("text",),
          input_sentence_size: int = 1_000_000, num_threads: int = 1, seed: int = 1234,
          character_coverage: float = 0.9999, skip_bad_lines: bool = False) -> str:
    """Train and atomically write ``{output_prefix}.model`` (+ ``.vocab``); returns the model path."""
    import sentencepiece as spm

    try:
        paths = expand_inputs(input_patterns)
        sentences = list(iter_sentences(paths, list(json_keys), skip_bad_lines))
    except InputError as e:
        raise TrainTokenizerError(str(e)) from None
    if not sentences:
        raise TrainTokenizerError(f"--input {' '.join(input_patterns)}: no text found under --json-keys "
                                  f"{' '.join(json_keys)}")
    if vocab_size < 259 + 3:
        raise TrainTokenizerError(f"--vocab-size {vocab_size} is too small: 3 special pieces and 256 byte "
                                  "pieces come first; use at least 300")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=character_coverage,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            max_sentence_length=MAX_SENTENCE_BYTES, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, num_threads=num_threads, minloglevel=2)
    except RuntimeError as e:
        message = str(e)
        if "Vocabulary size" in message:
            raise TrainTokenizerError(f"--vocab-size {vocab_size} is too large for this input ({message}); "
                                      "lower it or give more text") from None
        raise TrainTokenizerError(f"sentencepiece training failed: {message}") from None
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab_lines = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
                          for i in range(processor.get_piece_size()))
    with atomic_output(output_prefix + ".vocab", "w") as f:
        f.write(vocab_lines)
    with atomic_output(output_prefix + ".model", "wb") as f:
        f.write(model.getvalue())
    return output_prefix + ".model"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL file(s) or glob(s); .gz/.zst accepted")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--input-sentence-size", type=int, default=1_000_000,
                   help="sample at most this many sentences (0: all)")
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--character-coverage", type=float, default=0.9999)
    p.add_argument("--skip-bad-lines", action="store_true")
    args = p.parse_args(argv)
    try:
        path = train(args.input, args.output_prefix, args.vocab_size, args.json_keys, args.input_sentence_size,
                     args.num_threads, args.seed, args.character_coverage, args.skip_bad_lines)
    except TrainTokenizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
