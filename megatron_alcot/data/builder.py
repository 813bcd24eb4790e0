"""Train/valid/test datasets from Megatron's data flags (``DataConfig``), as Megatron builds them.

    from megatron_alcot.data.builder import build_train_valid_test_datasets
    from megatron_alcot.data.utils import get_train_valid_test_num_samples
    n = get_train_valid_test_num_samples(train_iters, global_batch_size, eval_interval, eval_iters)
    train, valid, test = build_train_valid_test_datasets(data_cfg, seq_length=2048, seed=1234,
                                                         num_samples=n, tokenizer=tok)

Call it on every rank (rank 0 builds the index caches, the others wait and load them). A split with
0 requested samples comes back as None, and so does a split that ``--split`` gives zero width.

* one ``--data-path`` prefix: one :class:`GPTDataset` per split, the split taken from the prefix's
  sequences by ``--split``;
* ``--data-path w1 p1 w2 p2 ...``: each prefix is split the same way and asked for
  ``ceil(ceil(n·w)·(1 + surplus))`` samples, then a :class:`BlendedDataset` of ``Σ ceil(n·w)``
  samples interleaves them;
* ``--data-path p1 p2 ...`` (no weights): one epoch of each prefix, blended in proportion to size;
* ``--train-data-path/--valid-data-path/--test-data-path``: the same per split, each blend using all
  of its prefixes' sequences (exclusive with ``--data-path`` and ``--split``);
* ``--mock-data``: deterministic synthetic sequences (Megatron's mock generator, split 1,1,1).
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import numpy

from megatron_alcot.config import ConfigError, DataConfig
from megatron_alcot.data.blended_dataset import BlendedDataset
from megatron_alcot.data.gpt_dataset import GPTDataset, MockLowLevelDataset, default_cache_dir, pad_token_id
from megatron_alcot.data.utils import (Split, normalize, parse_blend, size_per_dataset, split_matrix,
                                       split_range)

logger = logging.getLogger(__name__)

DEFAULT_SPLIT = DataConfig.split
MOCK_SPLIT = "1,1,1"


def build_train_valid_test_datasets(data_cfg: DataConfig, seq_length: int, seed: int,
                                    num_samples: Sequence[int], tokenizer=None) -> Tuple:
    """``(train, valid, test)``: GPTDataset / BlendedDataset / None per split (see module doc)."""
    if len(num_samples) != 3 or any(n is None or n < 0 for n in num_samples):
        raise ConfigError(f"num_samples must be three counts >= 0 (train, valid, test), got {num_samples}")
    common = dict(seq_length=seq_length, seed=seed, eod=_eod(tokenizer), pad=pad_token_id(tokenizer),
                  reset_position_ids=data_cfg.reset_position_ids,
                  reset_attention_mask=data_cfg.reset_attention_mask,
                  eod_mask_loss=data_cfg.eod_mask_loss)
    if data_cfg.mock_data:
        return _build_mock(data_cfg, num_samples, tokenizer, common)

    per_split = [data_cfg.train_data_path, data_cfg.valid_data_path, data_cfg.test_data_path]
    if any(per_split):
        if data_cfg.data_path:
            raise ConfigError("--data-path cannot be combined with --train-data-path/--valid-data-path/"
                              "--test-data-path; use one or the other")
        if data_cfg.split not in (None, "", DEFAULT_SPLIT):
            raise ConfigError(f"--split {data_cfg.split} cannot be combined with --train-data-path/"
                              "--valid-data-path/--test-data-path (each split has its own data); drop --split")
        flags = ("--train-data-path", "--valid-data-path", "--test-data-path")
        out = []
        for split, paths, n, flag in zip(Split, per_split, num_samples, flags):
            blend = parse_blend(paths, flag)
            if n == 0 or blend is None:
                if n > 0:
                    logger.warning("%d %s samples requested but %s is not given; no %s dataset",
                                   n, split.name, flag, split.name)
                out.append(None)
                continue
            bookends: List = [None, None, None]
            bookends[split.value] = (0.0, 1.0)
            out.append(_build_split(blend, bookends, split, n, data_cfg, common, flag, "per-split"))
        return tuple(out)

    if not data_cfg.data_path:
        raise ConfigError("no training data: give --data-path (or --train-data-path/--valid-data-path/"
                          "--test-data-path), or --mock-data for a synthetic smoke run")
    blend = parse_blend(data_cfg.data_path, "--data-path")
    matrix = split_matrix(data_cfg.split)
    out = []
    for split, n in zip(Split, num_samples):
        if n == 0:
            out.append(None)
        elif matrix[split.value] is None:
            logger.warning("%d %s samples requested but --split %s gives the %s split no data; "
                           "no %s dataset", n, split.name, data_cfg.split, split.name, split.name)
            out.append(None)
        else:
            out.append(_build_split(blend, matrix, split, n, data_cfg, common, "--data-path", data_cfg.split))
    return tuple(out)


def _eod(tokenizer) -> Optional[int]:
    return None if tokenizer is None else int(tokenizer.eod)


def _open(prefix: str, data_cfg: DataConfig, flag: str):
    from megatron_alcot.data.indexed_dataset import IndexedDataset, IndexedDatasetError

    try:
        return IndexedDataset(prefix, mmap=data_cfg.mmap_bin_files)
    except IndexedDatasetError as e:
        raise ConfigError(f"{flag} {prefix}: {e}") from None


def _gpt_split(prefix: str, low, bookends, split: Split, n: Optional[int], data_cfg: DataConfig,
               common: dict, split_description: str) -> GPTDataset:
    num_sequences = low.sequence_lengths.shape[0]
    beg, end = split_range(bookends[split.value], num_sequences)
    return GPTDataset(low, prefix, numpy.arange(beg, end, dtype=numpy.int32), n, split.name,
                      cache_dir=data_cfg.data_cache_path or default_cache_dir(prefix),
                      split_description=split_description, **common)


def _build_split(blend, bookends, split: Split, n: int, data_cfg: DataConfig, common: dict, flag: str,
                 split_description: str):
    prefixes, weights = blend
    if weights is not None:   # a zero weight switches a dataset off
        kept = [(p, w) for p, w in zip(prefixes, weights) if w > 0]
        if len(kept) < len(prefixes):
            logger.info("%s: ignoring %d dataset(s) with weight 0", flag, len(prefixes) - len(kept))
        prefixes, weights = [p for p, _ in kept], normalize([w for _, w in kept])
    lows = [_open(p, data_cfg, flag) for p in prefixes]
    if len(prefixes) == 1 and weights is None:
        return _gpt_split(prefixes[0], lows[0], bookends, split, n, data_cfg, common, split_description)

    cache_dir = data_cfg.data_cache_path or default_cache_dir(prefixes[0])
    if weights is not None:
        target = size_per_dataset(weights, n)
        buffer = size_per_dataset(weights, n, data_cfg.mid_level_dataset_surplus)
        parts = [_gpt_split(p, low, bookends, split, b, data_cfg, common, split_description)
                 for p, low, b in zip(prefixes, lows, buffer)]
        return BlendedDataset(parts, weights, sum(target), split.name, cache_dir,
                              data_cfg.mid_level_dataset_surplus)
    parts = [_gpt_split(p, low, bookends, split, None, data_cfg, common, split_description)
             for p, low in zip(prefixes, lows)]
    sizes = [len(d) for d in parts]
    size = min(n, sum(sizes))
    if size < n:
        message = (f"the unweighted {split.name} blend {' '.join(prefixes)} has {sum(sizes)} samples (one "
                   f"epoch of each dataset) but {n} are requested; give weights ('{flag} w1 p1 w2 p2 ...') "
                   "so datasets are repeated, or request fewer samples")
        if split is Split.train:
            raise ConfigError(message)
        logger.warning(message)
    return BlendedDataset(parts, sizes, size, split.name, cache_dir, data_cfg.mid_level_dataset_surplus)


def _build_mock(data_cfg: DataConfig, num_samples: Sequence[int], tokenizer, common: dict) -> Tuple:
    vocab = int(tokenizer.vocab_size) if tokenizer is not None else int(data_cfg.vocab_size or 1024)
    eod = common["eod"] if common["eod"] is not None else vocab - 1
    common = {**common, "eod": eod}
    low = MockLowLevelDataset(vocab, eod)
    matrix = split_matrix(MOCK_SPLIT)
    out = []
    for split, n in zip(Split, num_samples):
        if n == 0:
            out.append(None)
            continue
        beg, end = split_range(matrix[split.value], len(low))
        out.append(GPTDataset(low, None, numpy.arange(beg, end, dtype=numpy.int32), n, split.name,
                              cache_dir=None, split_description=MOCK_SPLIT, **common))
    return tuple(out)
