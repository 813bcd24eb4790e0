"""Megatron's pretraining sampler: global sample order driven by consumed samples, sliced per DP rank.

Global sample indices run ``consumed_samples, consumed_samples+1, ...``; they are cut into blocks of
``micro_batch_size · data_parallel_size`` and DP rank ``r`` takes the ``r``-th micro-batch of each
block. The global order therefore depends only on the dataset and the consumed-sample count: the
same at any DP size and after a resume at any consumed-sample count.

    sampler = PretrainingSampler(total_samples=len(train), consumed_samples=0,
                                 micro_batch_size=4, data_parallel_rank=dp_rank,
                                 data_parallel_size=dp_size)
    it = build_data_iterator(train, sampler, num_workers=2)
    batch = next(it)   # {"tokens": int64[4, s], "labels": int64[4, s], "loss_mask": float32[4, s], ...}
"""
from __future__ import annotations

from typing import Dict, Iterator, List

import torch

from megatron_alcot.config import ConfigError


class PretrainingSampler:
    """Batch sampler: yields this rank's list of ``micro_batch_size`` global sample indices per step.

    With ``drop_last=False`` a final incomplete block is also handed out (each rank its slice of it,
    possibly empty-then-skipped).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True) -> None:
        if total_samples <= 0:
            raise ConfigError(f"no samples to draw: the dataset has {total_samples} samples")
        if not 0 <= consumed_samples < total_samples:
            raise ConfigError(
                f"consumed samples {consumed_samples} is not below the dataset's {total_samples} samples; "
                "the checkpoint has used up the data (raise --train-iters/--train-samples only with more "
                "data, or check that --data-path matches the checkpoint)")
        if micro_batch_size <= 0:
            raise ConfigError(f"--micro-batch-size must be positive, got {micro_batch_size}")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ConfigError(f"data-parallel rank {data_parallel_rank} is outside a data-parallel group "
                              f"of size {data_parallel_size}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last
        self.block = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self.block)
        start = self.data_parallel_rank * self.micro_batch_size
        return full + (1 if rest > start and not self.drop_last else 0)

    def __iter__(self) -> Iterator[List[int]]:
        start = self.data_parallel_rank * self.micro_batch_size
        block_start = self.consumed_samples
        while block_start + self.block <= self.total_samples:
            first = block_start + start
            yield list(range(first, first + self.micro_batch_size))
            block_start += self.block
        if not self.drop_last and block_start < self.total_samples:
            first = block_start + start
            last = min(first + self.micro_batch_size, self.total_samples)
            if first < last:
                yield list(range(first, last))


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack per-sample tensors; tokens/labels/position_ids int64, loss_mask float32."""
    batch = {}
    for key in samples[0]:
        values = [torch.as_tensor(s[key]) for s in samples]
        batch[key] = torch.stack(values)
    for key in ("tokens", "labels", "position_ids", "attention_segment_ids", "dataset_id"):
        if key in batch:
            batch[key] = batch[key].to(torch.int64)
    if "loss_mask" in batch:
        batch["loss_mask"] = batch["loss_mask"].to(torch.float32)
    return batch


def build_data_iterator(dataset, sampler: PretrainingSampler, num_workers: int = 0) -> Iterator:
    """An iterator of collated micro-batches in the sampler's order (``DataLoader`` with workers).

        it = build_data_iterator(train_ds, PretrainingSampler(len(train_ds), consumed, 4, dp_rank, dp),
                                 num_workers=2)
    """
    if num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {num_workers}")
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         collate_fn=collate, pin_memory=False,
                                         persistent_workers=num_workers > 0)
    return iter(loader)
