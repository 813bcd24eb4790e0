"""Megatron-LM's GPT sample construction: document, sample and shuffle indices, built in numpy.

Sample ``i`` of a :class:`GPTDataset` is token-for-token the sample ``i`` of Megatron-core's
``GPTDataset`` for the same data, split, sequence length, sample count and seed::

    from megatron_alcot.data.indexed_dataset import IndexedDataset
    from megatron_alcot.data.gpt_dataset import GPTDataset
    low = IndexedDataset("data/corpus_text_document")
    ds = GPTDataset(low, "data/corpus_text_document", numpy.arange(0, len(low), dtype=numpy.int32),
                    num_samples=1000, split="train", seq_length=128, seed=1234, eod=tok.eod,
                    cache_dir="data/cache/GPTDataset_indices")
    sample = ds[0]   # dict of fresh torch tensors:
                     # tokens int64[s], labels int64[s], loss_mask float32[s], position_ids int64[s]
                     # (+ attention_segment_ids int64[s] with reset_attention_mask=True)

The algorithm (Megatron's, docs/data_format.md §2):

* epochs ``E`` = smallest ``E >= 1`` with ``E·tokens_per_epoch >= num_samples·seq_length + 1``;
* document index: the split's sequence ids repeated ``E`` times (int32), shuffled by
  ``numpy.random.RandomState(seed)``; when ``E > 1`` and the last epoch contributes fewer than 80% of
  an epoch's samples, the first ``E-1`` epochs and the last one are shuffled separately;
* sample index ``[num_samples+1, 2]`` of (position in document index, token offset): sample ``j``
  starts at token ``j·seq_length`` of the concatenated stream, so consecutive samples share one
  token. Megatron's C++ helper walks documents one by one; here the same rows come from a cumulative
  sum of document lengths and one ``searchsorted``;
* shuffle index: a permutation of the samples (two independently shuffled ranges with a separate
  final epoch), drawn from the same ``RandomState`` right after the document index.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional

import numpy
import torch

from megatron_alcot.config import ConfigError
from megatron_alcot.data.index_cache import build_or_load_indices, make_description

logger = logging.getLogger(__name__)

SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")


# ------------------------------------------------------------------------------------ index building
def num_epochs_for(tokens_per_epoch: int, num_samples: Optional[int], seq_length: int) -> int:
    """Smallest ``E >= 1`` with ``E·tokens_per_epoch >= num_samples·seq_length + 1`` (1 when None)."""
    if num_samples is None:
        return 1
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def separate_final_epoch(num_epochs: int, tokens_per_epoch: int, num_samples: int,
                         seq_length: int) -> tuple:
    """``(separate, samples_before_final_epoch)``: shuffle the last epoch apart when it is < 80% used."""
    if num_epochs == 1:
        return False, None
    before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    from_final = num_samples - before_final
    per_epoch = (tokens_per_epoch - 1) // seq_length
    assert 0 <= from_final <= per_epoch + 1, (from_final, per_epoch)
    return from_final < int(SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch), before_final


def build_document_index(documents: numpy.ndarray, num_epochs: int, rng: numpy.random.RandomState,
                         separate_final: bool) -> numpy.ndarray:
    """``documents`` repeated ``num_epochs`` times (epoch-major, int32), shuffled in place by ``rng``."""
    if not separate_final or num_epochs == 1:
        index = numpy.tile(numpy.asarray(documents, dtype=numpy.int32), num_epochs)
        rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return numpy.concatenate((first, last))


def num_samples_in_stream(total_tokens: int, seq_length: int, drop_last: bool = True) -> int:
    """Samples of ``seq_length+1`` tokens (one shared) in a stream; Megatron's float32 ceil otherwise."""
    if drop_last:
        return (total_tokens - 1) // seq_length
    return int(numpy.ceil(numpy.float32(total_tokens - 1) / numpy.float32(seq_length)))


def build_sample_index(sizes: numpy.ndarray, document_index: numpy.ndarray, seq_length: int,
                       num_epochs: int, tokens_per_epoch: int, drop_last: bool = True) -> numpy.ndarray:
    """Megatron's ``helpers.build_sample_idx``, vectorised: rows ``(doc position, offset)``.

    Row ``j`` holds where token ``j·seq_length`` of the stream ``sizes[document_index]`` lies: the
    document that contains it (empty documents are skipped, as the C++ loop does) and the offset in
    it. Row 0 is ``(0, 0)``. Without ``drop_last`` a last row past the stream's end is clamped to the
    last token of the last document, as the C++ loop does. dtype int32 unless an entry could exceed
    it (then int64), chosen the same way as Megatron.
    """
    num_samples = num_samples_in_stream(num_epochs * tokens_per_epoch, seq_length, drop_last)
    n_docs = document_index.shape[0]
    big = max(n_docs, int(sizes.max()) if sizes.size else 0) > numpy.iinfo(numpy.int32).max
    dtype = numpy.int64 if big else numpy.int32

    doc_end = sizes[document_index].astype(numpy.int64)       # lengths in stream order ...
    numpy.cumsum(doc_end, out=doc_end)                          # ... turned into end positions in place
    positions = numpy.arange(num_samples + 1, dtype=numpy.int64) * seq_length
    doc_pos = numpy.searchsorted(doc_end, positions, side="right")
    past_end = doc_pos >= n_docs
    doc_pos[past_end] = n_docs - 1
    starts = doc_end[doc_pos] - sizes[document_index[doc_pos]]
    offsets = positions - starts
    if past_end.any():
        offsets[past_end] = int(sizes[document_index[n_docs - 1]]) - 1
    sample_index = numpy.empty((num_samples + 1, 2), dtype=dtype)
    sample_index[:, 0] = doc_pos
    sample_index[:, 1] = offsets
    sample_index[0] = 0
    return sample_index


def build_shuffle_index(num_samples: int, total_size: int, rng: numpy.random.RandomState) -> numpy.ndarray:
    """Shuffled ``[0, num_samples)`` then, separately, ``[num_samples, total_size)``; uint32 unless huge."""
    dtype = numpy.int64 if total_size >= numpy.iinfo(numpy.uint32).max - 1 else numpy.uint32
    first = numpy.arange(0, num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = numpy.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return numpy.concatenate((first, last))


def build_gpt_indices(sizes: numpy.ndarray, documents: numpy.ndarray, num_samples: Optional[int],
                      seq_length: int, seed: int, drop_last: bool = True) -> Dict[str, numpy.ndarray]:
    """All three indices, in Megatron's RNG order (document shuffle(s), then sample shuffle(s)).

        >>> idx = build_gpt_indices(lengths, numpy.arange(len(lengths), dtype=numpy.int32), 100, 128, 1234)
        >>> idx["document_index"], idx["sample_index"], idx["shuffle_index"]
    """
    tokens_per_epoch = int(numpy.sum(sizes[documents], dtype=numpy.int64))
    epochs = num_epochs_for(tokens_per_epoch, num_samples, seq_length)
    separate, before_final = (False, None) if num_samples is None else separate_final_epoch(
        epochs, tokens_per_epoch, num_samples, seq_length)
    rng = numpy.random.RandomState(seed)
    document_index = build_document_index(documents, epochs, rng, separate)
    sample_index = build_sample_index(sizes, document_index, seq_length, epochs, tokens_per_epoch, drop_last)
    total = sample_index.shape[0] - 1
    shuffle_index = build_shuffle_index(before_final if separate else total, total, rng)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


# ------------------------------------------------------------------------------------------ masks
def ltor_masks_and_position_ids(tokens: numpy.ndarray, eod: Optional[int], reset_position_ids: bool,
                                reset_attention_mask: bool, eod_mask_loss: bool):
    """``(loss_mask float32, position_ids int64, segment_ids int64 or None)`` for a causal LM.

    ``segment_ids[t]`` counts the EOD tokens before ``t``: attention may cross from ``t`` to
    ``t' <= t`` only within one segment. That is Megatron's ``--reset-attention-mask`` dense mask,
    stored in O(s) instead of O(s²).
    """
    s = tokens.shape[0]
    loss_mask = numpy.ones(s, dtype=numpy.float32)
    position_ids = numpy.arange(s, dtype=numpy.int64)
    segment_ids = None
    if eod_mask_loss or reset_position_ids or reset_attention_mask:
        is_eod = tokens == eod
        if eod_mask_loss:
            loss_mask[is_eod] = 0.0
        if reset_position_ids:
            last_eod = numpy.maximum.accumulate(numpy.where(is_eod, position_ids, -1))
            doc_start = numpy.empty(s, dtype=numpy.int64)
            doc_start[0] = 0
            doc_start[1:] = last_eod[:-1] + 1
            position_ids = position_ids - doc_start
        if reset_attention_mask:
            segment_ids = numpy.zeros(s, dtype=numpy.int64)
            numpy.cumsum(is_eod[:-1], out=segment_ids[1:])
    return loss_mask, position_ids, segment_ids


def pad_token_id(tokenizer) -> int:
    """Megatron's rule: the tokenizer's pad id unless absent or equal to its EOD/EOS id, else -1."""
    pad = getattr(tokenizer, "pad", None) if tokenizer is not None else None
    if pad is None:
        return -1
    special = {getattr(tokenizer, name, None) for name in ("eos", "eod")}
    return -1 if pad in special else int(pad)


# ---------------------------------------------------------------------------------------- dataset
class GPTDataset(torch.utils.data.Dataset):
    """Megatron's GPTDataset over a low-level dataset (``sequence_lengths`` + ``get(i, offset, length)``).

    Args:
        low_level: an ``IndexedDataset`` (or :class:`MockLowLevelDataset`).
        dataset_path: the prefix, for the cache description (None for mock data).
        documents: int32 sequence ids of this split (``numpy.arange(beg, end)``).
        num_samples: samples requested; None builds exactly one epoch.
        split: ``"train" | "valid" | "test"``.
        cache_dir: where the indices are cached (None: built in memory, never saved).
        eod, pad: token ids; ``pad`` fills a short last validation sample and is loss-masked.
        drop_last_partial_validation_sequence: with False, the valid split keeps a padded last sample.

    ``__getitem__`` returns fresh torch tensors every call (never a cached, mutable object).
    """

    def __init__(self, low_level, dataset_path: Optional[str], documents: numpy.ndarray,
                 num_samples: Optional[int], split: str, seq_length: int, seed: int, *,
                 eod: Optional[int] = None, pad: int = -1, reset_position_ids: bool = False,
                 reset_attention_mask: bool = False, eod_mask_loss: bool = False,
                 cache_dir: Optional[str] = None, split_description: Optional[str] = None,
                 drop_last_partial_validation_sequence: bool = True) -> None:
        if seq_length < 2:
            raise ConfigError(f"--seq-length must be >= 2 to build GPT samples, got {seq_length}")
        if eod is None and (reset_position_ids or reset_attention_mask or eod_mask_loss):
            raise ConfigError("--eod-mask-loss / --reset-position-ids / --reset-attention-mask need the "
                              "tokenizer's end-of-document id; pass a tokenizer to the dataset builder")
        self.low_level = low_level
        self.dataset_path = dataset_path
        self.documents = numpy.asarray(documents, dtype=numpy.int32)
        self.num_samples = num_samples
        self.split = split
        self.seq_length = seq_length
        self.seed = seed
        self.eod, self.pad = eod, pad
        self.reset_position_ids = reset_position_ids
        self.reset_attention_mask = reset_attention_mask
        self.eod_mask_loss = eod_mask_loss
        self.drop_last = split != "valid" or drop_last_partial_validation_sequence

        sizes = low_level.sequence_lengths
        if self.documents.size == 0 or int(numpy.sum(sizes[self.documents], dtype=numpy.int64)) == 0:
            where = dataset_path or "mock data"
            raise ConfigError(
                f"the {split} split of {where} has no tokens ({self.documents.size} sequences) but "
                f"{num_samples if num_samples is not None else 'one epoch of'} samples are requested; "
                f"change --split ({split_description or 'given'}) so every used split gets sequences, or "
                "give this split its own data with --train/--valid/--test-data-path")
        if num_samples is not None and num_samples < 0:
            raise ConfigError(f"number of {split} samples must be >= 0, got {num_samples}")

        description = make_description(
            "GPTDataset", dataset_path=dataset_path, split=split, num_samples=num_samples,
            seq_length=seq_length, seed=seed, split_description=split_description,
            documents=(int(self.documents[0]), int(self.documents[-1]) + 1),
            num_sequences=int(sizes.shape[0]), drop_last=self.drop_last)
        self.description = description

        def build() -> Dict[str, numpy.ndarray]:
            return build_gpt_indices(numpy.asarray(sizes), self.documents, num_samples, seq_length,
                                     seed, self.drop_last)

        arrays = build_or_load_indices(cache_dir, "GPTDataset", split, description, INDEX_NAMES, build)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def sample_tokens(self, idx: int) -> numpy.ndarray:
        """The ``seq_length+1`` token ids (int64, a new array) of sample ``idx``, after shuffling."""
        j = int(self.shuffle_index[idx])
        beg_doc, beg_off = (int(v) for v in self.sample_index[j])
        end_doc, end_off = (int(v) for v in self.sample_index[j + 1])
        get = self.low_level.get
        if beg_doc == end_doc:
            parts = [get(int(self.document_index[beg_doc]), offset=beg_off, length=end_off - beg_off + 1)]
        else:
            parts = [get(int(self.document_index[beg_doc]), offset=beg_off)]
            parts += [get(int(self.document_index[d])) for d in range(beg_doc + 1, end_doc)]
            parts.append(get(int(self.document_index[end_doc]), offset=0, length=end_off + 1))
        length = sum(len(p) for p in parts)
        if length < self.seq_length + 1:
            parts.append(numpy.full(self.seq_length + 1 - length, self.pad, dtype=numpy.int64))
        return numpy.concatenate(parts, dtype=numpy.int64)

    def __getitem__(self, idx) -> Dict[str, torch.Tensor]:
        if not -len(self) <= int(idx) < len(self):
            raise IndexError(f"sample {idx} out of range for the {self.split} GPTDataset of "
                             f"{self.dataset_path or 'mock data'} ({len(self)} samples)")
        text = self.sample_tokens(int(idx) % len(self))
        tokens, labels = text[:-1].copy(), text[1:].copy()
        loss_mask, position_ids, segment_ids = ltor_masks_and_position_ids(
            tokens, self.eod, self.reset_position_ids, self.reset_attention_mask, self.eod_mask_loss)
        loss_mask[labels == self.pad] = 0.0
        tokens[tokens == self.pad] = 0
        labels[labels == self.pad] = 0
        sample = {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                  "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(position_ids)}
        if segment_ids is not None:
            sample["attention_segment_ids"] = torch.from_numpy(segment_ids)
        return sample


# ---------------------------------------------------------------------------------------- mock data
class MockLowLevelDataset:
    """Deterministic synthetic sequences for ``--mock-data`` (Megatron's mock generator).

    100000 sequences with lengths drawn once from ``numpy.random.default_rng(0)`` in ``[1, 4096)``;
    sequence ``i`` is ``1, 2, ..., len-1`` (mod vocab) followed by the EOD id.

        >>> low = MockLowLevelDataset(vocab_size=1024, eod=1023); low.get(0, offset=0, length=4)
    """

    size = 100000
    max_sequence_length = 4096

    def __init__(self, vocab_size: int, eod: int, seed: int = 0) -> None:
        self.vocab_size, self.eod = int(vocab_size), int(eod)
        rng = numpy.random.default_rng(seed=seed)
        self.sequence_lengths = rng.integers(low=1, high=self.max_sequence_length, size=self.size,
                                             dtype=numpy.int32)

    def __len__(self) -> int:
        return self.size

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> numpy.ndarray:
        n = int(self.sequence_lengths[idx])
        if length is None:
            length = n - offset
        stop = offset + length
        if length <= 0:
            return numpy.empty(0, dtype=numpy.int64)
        out = (numpy.arange(offset, stop, dtype=numpy.int64) + 1) % self.vocab_size
        if stop == n:
            out[-1] = self.eod
        return out


def default_cache_dir(dataset_path: str) -> str:
    """``cache/GPTDataset_indices`` in the directory of the dataset prefix."""
    return os.path.join(os.path.dirname(os.path.abspath(dataset_path)), "cache", "GPTDataset_indices")

