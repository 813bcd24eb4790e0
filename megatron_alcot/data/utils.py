"""Parsing of Megatron's data flags: ``--data-path`` blends, ``--split``, and per-split sample budgets.

    >>> parse_blend(["30", "data/a_text_document", "70", "data/b_text_document"])
    (['data/a_text_document', 'data/b_text_document'], [0.3, 0.7])
    >>> parse_blend(["data/a_text_document", "data/b_text_document"])
    (['data/a_text_document', 'data/b_text_document'], None)
    >>> split_matrix("969,30,1")[1]
    (0.969, 0.999)
    >>> get_train_valid_test_num_samples(train_iters=1000, global_batch_size=8,
    ...                                  eval_interval=100, eval_iters=10)
    (8000, 880, 80)

All errors are :class:`~megatron_alcot.config.ConfigError` naming the flag and the fix.
"""
from __future__ import annotations

import math
import re
from enum import Enum
from typing import List, Optional, Sequence, Tuple

import numpy

from megatron_alcot.config import ConfigError


class Split(Enum):
    """The three splits, in Megatron's order (their ``.name`` is part of every cache file name)."""

    train = 0
    valid = 1
    test = 2


def normalize(weights: Sequence[float]) -> List[float]:
    """Divide by the sum in float64, exactly as Megatron does (the rounding matters for blends)."""
    w = numpy.array(weights, dtype=numpy.float64)
    return (w / numpy.sum(w)).tolist()


def parse_blend(values: Optional[Sequence[str]], flag: str = "--data-path"
                ) -> Optional[Tuple[List[str], Optional[List[float]]]]:
    """``[w1, p1, w2, p2, ...]`` -> ``(prefixes, weights)``; ``[p1, p2, ...]`` -> ``(prefixes, None)``.

    A list is weighted when it has even length and *every* odd position (1st, 3rd, ...) parses as a
    number; otherwise all entries are prefixes and each dataset contributes in proportion to its
    size. Weights are returned as given (the builder normalizes them). Weights that parse but are
    negative, not finite, or sum to zero raise ``ConfigError``; so does a list that mixes numbers
    and paths in the weight positions, which is almost always a missing weight.
    """
    if values is None:
        return None
    values = [str(v).strip() for v in values]
    if not values:
        return None
    if any(not v for v in values):
        raise ConfigError(f"{flag} contains an empty entry: {values!r}")
    parsed = [_as_float(values[i]) for i in range(0, len(values), 2)]
    if len(values) % 2 == 1 or all(p is None for p in parsed):
        numeric = [v for v in values if _as_float(v) is not None]
        if numeric and len(values) % 2 == 1:
            raise ConfigError(
                f"{flag} {' '.join(values)}: {numeric[0]!r} looks like a weight but the list has odd "
                f"length; give one weight per dataset ('w1 p1 w2 p2 ...') or no weights at all")
        return values, None
    if any(p is None for p in parsed):
        bad = [values[i] for i in range(0, len(values), 2) if _as_float(values[i]) is None]
        raise ConfigError(
            f"{flag} {' '.join(values)}: weight {bad[0]!r} is not a number; use 'w1 p1 w2 p2 ...' "
            "with a number before every dataset prefix, or list the prefixes alone")
    prefixes = [values[i] for i in range(1, len(values), 2)]
    for w, p in zip(parsed, prefixes):
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"{flag}: weight {w} of {p!r} must be a finite number >= 0")
        if _as_float(p) is not None:
            raise ConfigError(f"{flag}: {p!r} stands where a dataset prefix belongs; "
                              "check that weights and prefixes alternate ('w1 p1 w2 p2 ...')")
    if sum(parsed) <= 0:
        raise ConfigError(f"{flag}: the weights {parsed} sum to zero; give at least one positive weight")
    return prefixes, parsed


def _as_float(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def parse_split(split: str) -> List[float]:
    """``"969,30,1"`` -> normalized ``[0.969, 0.03, 0.001]`` (missing entries are 0), as Megatron."""
    if not isinstance(split, str) or not split.strip():
        raise ConfigError(f"--split {split!r} is empty; give up to three weights such as 969,30,1")
    parts = [p for p in re.split(r"[,/:\s]+", split.strip()) if p]
    values = []
    for p in parts:
        v = _as_float(p)
        if v is None or not math.isfinite(v) or v < 0:
            raise ConfigError(f"--split {split!r}: {p!r} is not a non-negative number; "
                              "use three comma-separated weights such as 969,30,1")
        values.append(v)
    if len(values) > len(Split):
        raise ConfigError(f"--split {split!r} has {len(values)} parts; give at most 3 (train,valid,test)")
    values += [0.0] * (len(Split) - len(values))
    if sum(values) <= 0:
        raise ConfigError(f"--split {split!r} sums to zero; give at least one positive weight")
    return normalize(values)


def split_matrix(split: str) -> List[Optional[Tuple[float, float]]]:
    """Book-ends ``[(0, .969), (.969, .999), (.999, 1.0)]`` of each split; None for a zero-width split."""
    vector = parse_split(split)
    ends = [0.0]
    for v in vector:
        ends.append(ends[-1] + v)
    return [None if end <= beg else (beg, end) for beg, end in zip(ends[:-1], ends[1:])]


def split_range(bookends: Tuple[float, float], num_sequences: int) -> Tuple[int, int]:
    """Sequence range ``[beg, end)`` of a split: Python's round (half to even) of ``b·N``, as Megatron."""
    beg = int(round(bookends[0] * float(num_sequences)))
    end = int(round(bookends[1] * float(num_sequences)))
    return beg, end


def size_per_dataset(weights: Sequence[float], target: int, surplus: float = 0.0) -> List[int]:
    """Samples to request from each blend component: ``ceil(ceil(target·w)·(1+surplus))``."""
    return [int(math.ceil(math.ceil(target * w) * (1 + surplus))) for w in weights]


def get_train_valid_test_num_samples(train_iters: int, global_batch_size: int, eval_interval: int,
                                     eval_iters: int, train_samples: Optional[int] = None
                                     ) -> Tuple[int, int, int]:
    """Megatron's sample budget per split.

    ``train = train_samples or train_iters·GBS``; ``valid = (train_iters // eval_interval + 1)·
    eval_iters·GBS`` (one evaluation every interval plus the final one); ``test = eval_iters·GBS``.
    """
    if global_batch_size <= 0:
        raise ConfigError(f"--global-batch-size must be positive, got {global_batch_size}")
    if eval_iters < 0:
        raise ConfigError(f"--eval-iters must be >= 0, got {eval_iters}")
    if eval_iters > 0 and eval_interval <= 0:
        raise ConfigError(f"--eval-interval must be positive when --eval-iters > 0, got {eval_interval}")
    train = train_samples if train_samples is not None else train_iters * global_batch_size
    if eval_iters == 0:
        return train, 0, 0
    valid = (train_iters // eval_interval + 1) * eval_iters * global_batch_size
    return train, valid, eval_iters * global_batch_size
