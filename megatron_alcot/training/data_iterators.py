"""Train / validation iterators driven by consumed samples (DESIGN §5).

    train_it, make_valid_it = build_iterators(args, tokenizer, train_iters, consumed_samples,
                                              dp_rank, dp_size)
    batch = next(train_it)        # {"tokens", "labels", "loss_mask", "position_ids"}: [mbs, s]
    valid_it = make_valid_it()    # a fresh pass over the same validation samples every time

The training order is a function of (config, seed, sample index): the sampler starts at
``consumed_samples``, so a resumed run reads exactly the samples the uninterrupted run would have
read, whatever the DP size. DataLoader workers only fetch: each index maps to one sample
deterministically, and batches come back in sampler order.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterator, Tuple

import numpy as np
import torch


class _MockDataset:
    """Deterministic random tokens (used only when the data package has no mock dataset)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.n, self.s, self.v, self.seed = num_samples, seq_length, vocab_size, seed

    def __len__(self):
        return self.n

    def __getitem__(self, idx):
        rng = np.random.default_rng((self.seed, int(idx)))
        # A learnable stream: each token is the previous one plus a small random step.
        steps = rng.integers(1, 4, size=self.s + 1)
        start = rng.integers(0, self.v)
        seq = (start + np.cumsum(steps)) % self.v
        tokens = torch.from_numpy(seq.astype(np.int64))
        return {"tokens": tokens[:-1], "labels": tokens[1:],
                "loss_mask": torch.ones(self.s, dtype=torch.float32),
                "position_ids": torch.arange(self.s, dtype=torch.int64)}


class _Sampler:
    """Megatron's pretraining sampler: rank r takes slice r of each ``mbs·dp`` chunk."""

    def __init__(self, total, consumed, mbs, dp_rank, dp_size):
        self.total, self.consumed, self.mbs = total, consumed, mbs
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __len__(self):
        return self.total

    def __iter__(self):
        chunk = self.mbs * self.dp_size
        start = self.dp_rank * self.mbs
        for first in range(self.consumed, self.total - chunk + 1, chunk):
            yield list(range(first + start, first + start + self.mbs))


def _datasets(args, tokenizer, num_samples):
    data = args.data
    try:
        from megatron_alcot.data.builder import build_train_valid_test_datasets
    except ImportError:
        if not data.mock_data:
            raise
        seq, vocab = args.model.seq_length, tokenizer.vocab_size
        return tuple(_MockDataset(max(n, 1), seq, vocab, args.train.seed + i)
                     for i, n in enumerate(num_samples))
    return build_train_valid_test_datasets(data, seq_length=args.model.seq_length,
                                           seed=args.train.seed, num_samples=num_samples,
                                           tokenizer=tokenizer)


def _sampler_cls():
    try:
        from megatron_alcot.data.sampler import PretrainingSampler
        return PretrainingSampler
    except ImportError:
        return _Sampler


def _loader(dataset, sampler, num_workers: int):
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=False)


def build_iterators(args, tokenizer, train_iters: int, consumed_samples: int, dp_rank: int,
                    dp_size: int) -> Tuple[Iterator, Callable[[], Iterator]]:
    t = args.train
    gbs = t.resolved_global_batch(dp_size)
    n_train = train_iters * gbs
    n_valid = t.eval_iters * gbs
    train_ds, valid_ds, _ = _datasets(args, tokenizer, (n_train, n_valid, 0))
    sampler_cls = _sampler_cls()
    workers = args.data.num_workers
    train_sampler = sampler_cls(len(train_ds), consumed_samples, t.micro_batch_size, dp_rank, dp_size)
    train_it = iter(_loader(train_ds, train_sampler, workers))

    def make_valid():
        if valid_ds is None or n_valid == 0 or len(valid_ds) == 0:
            return None
        sampler = sampler_cls(len(valid_ds), 0, t.micro_batch_size, dp_rank, dp_size)
        # Cycle so that a validation split smaller than eval_iters·gbs still fills the passes.
        return itertools.cycle(_loader(valid_ds, sampler, 0)) if len(valid_ds) < n_valid \
            else iter(_loader(valid_ds, sampler, 0))

    return train_it, make_valid
