"""Megatron's weighted blend of datasets: deterministic greedy interleaving, no RNG.

Global sample ``i`` comes from the dataset ``d`` with the largest error ``w_d·max(i, 1) − count_d``
(first index on ties), exactly as Megatron's C++ ``build_blending_indices``::

    blend = BlendedDataset([ds_a, ds_b], weights=[0.3, 0.7], size=1000, cache_dir="cache/")
    blend.dataset_index          # int16[size]: which dataset serves sample i
    blend.dataset_sample_index   # int64[size]: which sample of that dataset
    blend[i]                     # {"dataset_id": int, **ds[...]}

The greedy choice depends on every earlier choice, so it cannot be computed by one closed formula;
:func:`build_blending_indices` guesses the whole sequence by merging each dataset's ideal pick times
``k / w_d``, checks the guess against the greedy rule block by block with vectorised numpy (counts
by cumulative sums, choice by argmax), and repairs the rare positions where it differs. The result
equals the sequential greedy loop exactly. When the guess is poor for a weight vector (many
repairs), the rest is finished by the plain sequential loop (about 1 µs a sample).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import numpy
import torch

from megatron_alcot.config import ConfigError
from megatron_alcot.data.index_cache import build_or_load_indices, make_description
from megatron_alcot.data.utils import normalize

logger = logging.getLogger(__name__)

INDEX_NAMES = ("dataset_index", "dataset_sample_index")


def _greedy_choice(weights: numpy.ndarray, counts_before: numpy.ndarray, first: int,
                   picks: numpy.ndarray) -> numpy.ndarray:
    """The greedy rule's choice at positions ``first ..`` if the earlier picks are ``picks``."""
    n, num = picks.shape[0], weights.shape[0]
    onehot = numpy.zeros((n, num), dtype=numpy.int64)
    onehot[numpy.arange(n), picks] = 1
    counts = numpy.cumsum(onehot, axis=0)
    counts -= onehot
    counts += counts_before
    steps = numpy.maximum(numpy.arange(first, first + n, dtype=numpy.float64), 1.0)
    error = weights[None, :] * steps[:, None] - counts
    return numpy.argmax(error, axis=1)


def _next_occurrence(picks: numpy.ndarray, start: int, value: int) -> Optional[int]:
    """First position ``>= start`` holding ``value`` (searched in growing windows), or None."""
    window = 64
    while start < picks.shape[0]:
        hit = numpy.flatnonzero(picks[start:start + window] == value)
        if hit.size:
            return start + int(hit[0])
        start += window
        window *= 4
    return None


def _merge_guess(weights: numpy.ndarray, size: int) -> numpy.ndarray:
    """Each dataset's k-th pick placed at time ``k / w_d``, merged (ties: lower dataset first)."""
    times, ids = [], []
    for d, w in enumerate(weights):
        if w <= 0:
            continue
        k = numpy.arange(int(numpy.ceil(w * size)) + 2, dtype=numpy.float64)
        times.append(k / w)
        ids.append(numpy.full(k.shape[0], d, dtype=numpy.int64))
    times, ids = numpy.concatenate(times), numpy.concatenate(ids)
    order = numpy.lexsort((ids, times))
    return ids[order[: size + len(weights) + 2]]


def _greedy_loop(weights: numpy.ndarray, counts: numpy.ndarray, first: int, picks: numpy.ndarray) -> None:
    """The plain sequential greedy rule for positions ``first ..`` (writes ``picks`` in place)."""
    w = [float(x) for x in weights]
    c = [float(x) for x in counts]
    rng = range(1, len(w))
    out = []
    for i in range(first, picks.shape[0]):
        x = float(i) if i > 1 else 1.0
        best, best_err = 0, w[0] * x - c[0]
        for d in rng:
            err = w[d] * x - c[d]
            if err > best_err:
                best, best_err = d, err
        c[best] += 1.0
        out.append(best)
    picks[first:] = out


def build_blending_indices(weights: Sequence[float], size: int):
    """``(dataset_index int16[size], dataset_sample_index int64[size])`` of Megatron's greedy blend.

        >>> build_blending_indices([0.25, 0.75], 8)[0]
        array([1, 0, 1, 1, 0, 1, 1, 1], dtype=int16)

    ``weights`` must already be normalized (as Megatron passes them).
    """
    w = numpy.asarray(weights, dtype=numpy.float64)
    num = w.shape[0]
    if size <= 0:
        return numpy.zeros(0, numpy.int16), numpy.zeros(0, numpy.int64)
    picks = _merge_guess(w, size)
    max_block = int(min(65536, max(256, (1 << 21) // num)))
    block = max_block
    counts = numpy.zeros(num, dtype=numpy.int64)
    pos = repairs = 0
    while pos < size:
        if repairs > 64 and repairs * 200 > pos:      # the guess is poor for these weights
            _greedy_loop(w, counts, pos, picks[:size])
            break
        end = min(pos + block, size)
        choice = _greedy_choice(w, counts, pos, picks[pos:end])
        wrong = numpy.flatnonzero(choice != picks[pos:end])
        if wrong.size == 0:
            counts += numpy.bincount(picks[pos:end], minlength=num)
            pos = end
            block = min(max_block, block * 2)
            continue
        m = pos + int(wrong[0])
        repairs += 1
        counts += numpy.bincount(picks[pos:m], minlength=num)
        want = int(choice[wrong[0]])
        later = _next_occurrence(picks, m + 1, want)
        if later is not None:                    # move the next pick of `want` forward to position m
            m2 = later
            picks[m + 1:m2 + 1] = picks[m:m2].copy()
        else:                             # none left in the guess: insert it
            picks[m + 1:] = picks[m:-1].copy()
        picks[m] = want
        pos = m
        block = max(256, min(max_block, 4 * int(wrong[0]) + 256))
    logger.debug("blending indices: %d repairs of the merged guess for %d samples", repairs, size)
    dataset_index = picks[:size].astype(numpy.int16)
    order = numpy.argsort(dataset_index, kind="stable")
    group_start = numpy.searchsorted(dataset_index[order], numpy.arange(num))
    dataset_sample_index = numpy.empty(size, dtype=numpy.int64)
    dataset_sample_index[order] = numpy.arange(size, dtype=numpy.int64) - group_start[dataset_index[order]]
    return dataset_index, dataset_sample_index


class BlendedDataset(torch.utils.data.Dataset):
    """Interleave ``datasets`` in proportion to ``weights`` (normalized here, as Megatron does).

    ``size`` samples in all; ``cache_dir`` (or None) holds ``{md5}-BlendedDataset-{split}-*.npy``.
    Raises ``ConfigError`` when the blend needs more samples from a dataset than it has.
    """

    def __init__(self, datasets: List, weights: Sequence[float], size: int, split: str,
                 cache_dir: Optional[str] = None, surplus: float = 0.005) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        if len(datasets) >= numpy.iinfo(numpy.int16).max:
            raise ConfigError(f"--data-path blends {len(datasets)} datasets; at most 32766 are supported")
        if any(not w > 0 for w in weights):
            raise ConfigError(f"blend weights must all be positive, got {list(weights)}")
        self.datasets = datasets
        self.weights = normalize(weights)
        self.size = int(size)
        self.split = split
        description = make_description(
            "BlendedDataset", datasets=[getattr(d, "description", repr(d)) for d in datasets],
            split=split, weights=self.weights, size=self.size)
        self.description = description

        def build() -> Dict[str, numpy.ndarray]:
            dataset_index, dataset_sample_index = build_blending_indices(self.weights, self.size)
            used = numpy.bincount(dataset_index, minlength=len(datasets))
            for d, (n_used, ds) in enumerate(zip(used, datasets)):
                if n_used > len(ds):
                    raise ConfigError(
                        f"the {split} blend needs {n_used} samples from dataset {d} "
                        f"({getattr(ds, 'dataset_path', '?')}) but it has {len(ds)}; raise "
                        f"--mid-level-dataset-surplus (now {surplus}), e.g. ten-fold")
            return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

        arrays = build_or_load_indices(cache_dir, "BlendedDataset", split, description, INDEX_NAMES, build)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]

    def __len__(self) -> int:
        return self.dataset_index.shape[0]

    def __getitem__(self, idx) -> Dict[str, torch.Tensor]:
        d = int(self.dataset_index[idx])
        sample = self.datasets[d][int(self.dataset_sample_index[idx])]
        return {"dataset_id": torch.tensor(d, dtype=torch.int64), **sample}
