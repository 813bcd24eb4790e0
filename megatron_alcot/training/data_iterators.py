"""Train / validation iterators driven by consumed samples (docs/data_format.md §2).

    train_it, make_valid_it = build_iterators(args, tokenizer, train_iters, consumed_samples,
                                              dp_rank, dp_size)
    batch = next(train_it)        # {"tokens", "labels", "loss_mask", "position_ids"}: [mbs, s]
    valid_it = make_valid_it()    # a fresh pass over the same validation samples every time

The training order is a function of (config, seed, sample index): the sampler starts at
``consumed_samples``, so a resumed run reads exactly the samples the uninterrupted run would have
read, whatever the DP size. DataLoader workers only fetch: each index maps to one sample
deterministically, and batches come back in sampler order. They ignore SIGTERM/SIGINT/SIGUSR1/
SIGUSR2, which the main process handles (``--exit-signal-handler``).
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterator, Tuple

import torch

from megatron_alcot.data.sampler import PretrainingSampler
from megatron_alcot.training.signals import ignore_stop_signals


def _datasets(args, tokenizer, num_samples):
    from megatron_alcot.data.builder import build_train_valid_test_datasets
    return build_train_valid_test_datasets(args.data, seq_length=args.model.seq_length,
                                           seed=args.train.seed, num_samples=num_samples,
                                           tokenizer=tokenizer)


def _loader(dataset, sampler, num_workers: int):
    # A private generator: iter(DataLoader) draws its worker base seed from the generator it is
    # given, and drawing from the global one would shift dropout masks after a resume.
    # Workers ignore the stop signals: Slurm signals every process of the step, and a worker killed
    # by it would crash the main process before it can save (training/signals.py).
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=False, generator=torch.Generator(),
                                       worker_init_fn=ignore_stop_signals if num_workers else None)


def build_iterators(args, tokenizer, train_iters: int, consumed_samples: int, dp_rank: int,
                    dp_size: int) -> Tuple[Iterator, Callable[[], Iterator]]:
    t = args.train
    gbs = t.resolved_global_batch(dp_size)
    n_train = train_iters * gbs
    n_valid = t.eval_iters * gbs
    train_ds, valid_ds, _ = _datasets(args, tokenizer, (n_train, n_valid, 0))
    sampler_cls = PretrainingSampler
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
