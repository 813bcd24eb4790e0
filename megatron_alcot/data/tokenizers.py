"""Tokenizers behind one interface, chosen by Megatron's ``--tokenizer-type`` names.

    >>> tok = build_tokenizer("Llama2Tokenizer", tokenizer_model="tok.model")
    >>> ids = tok.tokenize("Hello world")             # list[int], no BOS/EOS added
    >>> tok.tokenize_batch(["a", "b"], num_threads=4)  # the backend's native batch encode
    >>> tok.detokenize(ids), tok.vocab_size, tok.eod, tok.bos, tok.pad

Types (``TOKENIZER_TYPES``):

- ``SentencePieceTokenizer``, ``Llama2Tokenizer``, ``GPTSentencePieceTokenizer``: a SentencePiece
  ``.model`` file. Text is encoded as is (no BOS/EOS); ``eod`` is the model's EOS id, as in
  megatron-core's SentencePiece tokenizer. (Megatron-LM's *legacy* ``SentencePieceTokenizer``
  appended ``<CLS>/<SEP>/<EOD>/<MASK>`` ids beyond the model's vocabulary; that mode is not offered.)
- ``HuggingFaceTokenizer``: a ``tokenizer.json`` file, or a directory holding one (plus, if present,
  ``tokenizer_config.json`` for the names of the EOS/BOS/PAD tokens). Encoding adds the special
  tokens the file's post-processor defines (e.g. LLaMA's BOS), like ``AutoTokenizer(text)``.
  Loaded with the ``tokenizers`` library; nothing is downloaded.
- ``NullTokenizer``: text is whitespace-separated integer ids; ``vocab_size`` is given and
  ``eod = vocab_size - 1`` (Megatron's NullTokenizer reserves its last id the same way; note that
  Megatron counts ``--vocab-size`` without that id, this class counts it).
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

TOKENIZER_TYPES = ("SentencePieceTokenizer", "Llama2Tokenizer", "GPTSentencePieceTokenizer",
                   "HuggingFaceTokenizer", "NullTokenizer")
NEEDS_TOKENIZER_MODEL = tuple(t for t in TOKENIZER_TYPES if t != "NullTokenizer")


class TokenizerError(ValueError):
    """The tokenizer cannot be built or used as asked. The message names the flag to change."""


class Tokenizer:
    """Common interface. Subclasses set ``vocab_size``, ``eod``, ``bos``, ``pad`` (-1 when absent)."""

    name = "Tokenizer"

    def tokenize(self, text: str) -> List[int]:
        raise NotImplementedError

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 0) -> List[List[int]]:
        """Encode many texts; ``num_threads`` 0 lets the backend choose, 1 stays on this thread."""
        return [self.tokenize(t) for t in texts]

    def tokenize_batch_arrays(self, texts: Sequence[str], num_threads: int = 0) -> List["numpy.ndarray"]:
        """Like ``tokenize_batch`` but one int32 numpy array per text (no Python ints where avoidable)."""
        import numpy

        return [numpy.asarray(ids, dtype=numpy.int32) for ids in self.tokenize_batch(texts, num_threads)]

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eod(self) -> int:
        raise NotImplementedError

    @property
    def bos(self) -> int:
        return -1

    @property
    def pad(self) -> int:
        return -1

    @property
    def eos(self) -> int:
        return self.eod

    def __repr__(self) -> str:
        return f"{self.name}(vocab_size={self.vocab_size})"


# ------------------------------------------------------------------------------------- SentencePiece
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``. ``eod`` is the model's EOS id (``</s>``, 2 in LLaMA's layout)."""

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str) -> None:
        import sentencepiece

        _require_file(model_file, "a SentencePiece .model file")
        self.model_file = model_file
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"--tokenizer-model {model_file}: not a SentencePiece model ({e})") from None
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"--tokenizer-model {model_file}: the model has no EOS piece, so there is no "
                                 "end-of-document id; train it with eos_id set (tools/train_tokenizer.py does)")

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 0) -> List[List[int]]:
        return self._sp.encode(list(texts), num_threads=num_threads if num_threads > 0 else -1)

    def tokenize_batch_arrays(self, texts: Sequence[str], num_threads: int = 0) -> List["numpy.ndarray"]:
        threads = num_threads if num_threads > 0 else -1
        try:
            return self._sp.encode(list(texts), num_threads=threads, out_type="numpy")
        except ValueError:  # sentencepiece < 0.2.1 has no numpy output
            return super().tokenize_batch_arrays(texts, num_threads)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        return self._sp.pad_id()


class Llama2Tokenizer(SentencePieceTokenizer):
    """LLaMA-1/2 SentencePiece model (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2); ``eod`` = EOS."""

    name = "Llama2Tokenizer"


class GPTSentencePieceTokenizer(SentencePieceTokenizer):
    """SentencePiece model used GPT-style; ``eod`` = EOS."""

    name = "GPTSentencePieceTokenizer"


# --------------------------------------------------------------------------------------- HuggingFace
_EOS_GUESSES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")
_BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_PAD_GUESSES = ("<pad>", "<|pad|>", "[PAD]")


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer from ``tokenizer.json`` (a file or a directory holding it)."""

    name = "HuggingFaceTokenizer"

    def __init__(self, path: str, eos_token: Optional[str] = None, bos_token: Optional[str] = None,
                 pad_token: Optional[str] = None, add_special_tokens: bool = True) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if os.path.isdir(path) and not os.path.isfile(json_path):
            raise TokenizerError(f"--tokenizer-model {path}: the directory has no tokenizer.json; point the "
                                 "flag at a directory saved by a fast (Rust) Hugging Face tokenizer")
        _require_file(json_path, "a tokenizer.json file or a directory containing one")
        try:
            self._tok = HFTokenizer.from_file(json_path)
        except Exception as e:  # the Rust side raises its own exception type
            raise TokenizerError(f"--tokenizer-model {json_path}: cannot load it as a Hugging Face "
                                 f"tokenizer.json ({e})") from None
        self.path = path
        self.add_special_tokens = add_special_tokens
        config = _read_tokenizer_config(os.path.dirname(json_path))
        self._eos = self._special_id(eos_token or config.get("eos_token"), _EOS_GUESSES)
        self._bos = self._special_id(bos_token or config.get("bos_token"), _BOS_GUESSES)
        self._pad = self._special_id(pad_token or config.get("pad_token"), _PAD_GUESSES)

    def _special_id(self, name: Optional[str], guesses: Sequence[str]) -> int:
        for candidate in ([name] if name else list(guesses)):
            token_id = self._tok.token_to_id(candidate)
            if token_id is not None:
                return token_id
        return -1

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=self.add_special_tokens).ids

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 0) -> List[List[int]]:
        # The Rust pool size is fixed per process (RAYON_NUM_THREADS, TOKENIZERS_PARALLELISM).
        if num_threads == 1:
            return [e.ids for e in (self._tok.encode(t, add_special_tokens=self.add_special_tokens)
                                    for t in texts)]
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=self.add_special_tokens)
        return [e.ids for e in encodings]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        if self._eos < 0:
            raise TokenizerError(
                f"--tokenizer-model {self.path}: no end-of-document token found (looked for "
                f"{', '.join(_EOS_GUESSES)} and tokenizer_config.json's eos_token); add eos_token to "
                "tokenizer_config.json next to tokenizer.json")
        return self._eos

    @property
    def bos(self) -> int:
        return self._bos

    @property
    def pad(self) -> int:
        return self._pad


def _read_tokenizer_config(directory: str) -> dict:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read it as JSON ({e}); fix or remove the file") from None
    out = {}
    for key in ("eos_token", "bos_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------- Null
class NullTokenizer(Tokenizer):
    """Text is whitespace-separated integer ids; ``eod = vocab_size - 1``.

    >>> t = NullTokenizer(100); t.tokenize("3 4 5"), t.eod
    ([3, 4, 5], 99)
    """

    name = "NullTokenizer"

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) < 2:
            raise TokenizerError("NullTokenizer needs --vocab-size >= 2 (ids are 0 .. vocab_size-1, the last "
                                 "one being the end-of-document id)")
        self._vocab_size = int(vocab_size)

    def tokenize(self, text: str) -> List[int]:
        try:
            ids = [int(x) for x in text.split()]
        except ValueError:
            raise TokenizerError(f"NullTokenizer expects whitespace-separated integers, got {text[:60]!r}") from None
        for i in ids:
            if not 0 <= i < self._vocab_size:
                raise TokenizerError(f"NullTokenizer: id {i} is outside 0..{self._vocab_size - 1} "
                                     "(raise --vocab-size)")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1


# --------------------------------------------------------------------------------------------- build
def _require_file(path: Optional[str], what: str) -> None:
    if not path:
        raise TokenizerError(f"--tokenizer-model is required: give the path of {what}")
    if not os.path.exists(path):
        raise TokenizerError(f"--tokenizer-model {path}: file not found (expected {what})")


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None,
                    vocab_size: Optional[int] = None, **kwargs) -> Tokenizer:
    """Build a tokenizer from Megatron's flags (``--tokenizer-type``, ``--tokenizer-model``, ``--vocab-size``).

        >>> build_tokenizer("NullTokenizer", vocab_size=1024).eod
        1023
        >>> build_tokenizer("HuggingFaceTokenizer", tokenizer_model="hf_dir/")   # doctest: +SKIP
    """
    if tokenizer_type in ("SentencePieceTokenizer", "Llama2Tokenizer", "GPTSentencePieceTokenizer"):
        cls = {"SentencePieceTokenizer": SentencePieceTokenizer, "Llama2Tokenizer": Llama2Tokenizer,
               "GPTSentencePieceTokenizer": GPTSentencePieceTokenizer}[tokenizer_type]
        _require_file(tokenizer_model, "a SentencePiece .model file")
        return cls(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        _require_file(tokenizer_model, "a tokenizer.json file or a directory containing one")
        return HuggingFaceTokenizer(tokenizer_model, **kwargs)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise TokenizerError("--tokenizer-type NullTokenizer needs --vocab-size")
        return NullTokenizer(vocab_size)
    raise TokenizerError(f"--tokenizer-type {tokenizer_type!r} is unknown; choose one of {', '.join(TOKENIZER_TYPES)}")
