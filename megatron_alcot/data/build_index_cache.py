"""Pre-build the dataset index caches on a CPU node, with the same flags as the training run.

    python tools/build_index_cache.py --data-parallel-size 64 <the pretrain_alcot.py flags>

The cache files (``{md5}-GPTDataset-{split}-*.npy`` and ``{md5}-BlendedDataset-*``) land in
``--data-cache-path`` (default ``cache/GPTDataset_indices`` next to each dataset prefix), exactly
where training looks for them, so rank 0 of the training job only memory-maps them. The sample
budget is Megatron's: ``train_iters·GBS``, ``(train_iters // eval_interval + 1)·eval_iters·GBS``,
``eval_iters·GBS``. ``--data-parallel-size`` is only needed when ``--global-batch-size`` is not given
(GBS = micro batch × DP). Model and optimizer flags are parsed and ignored.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time


from megatron_alcot.arguments import parse_args
from megatron_alcot.config import ConfigError
from megatron_alcot.data.builder import build_train_valid_test_datasets
from megatron_alcot.data.utils import get_train_valid_test_num_samples


def main(argv=None) -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--data-parallel-size", type=int, default=1)
    mine, rest = own.parse_known_args(argv)
    args = parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        dp = mine.data_parallel_size
        train = args.train
        gbs = train.resolved_global_batch(dp)
        train_iters = train.resolved_train_iters(dp)
        num_samples = get_train_valid_test_num_samples(train_iters, gbs, train.eval_interval,
                                                       train.eval_iters, train.train_samples)
        if args.data.mock_data:
            print("--mock-data builds its indices in memory; nothing to cache")
            return 0
        t0 = time.perf_counter()
        datasets = build_train_valid_test_datasets(args.data, args.model.seq_length, train.seed, num_samples)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, n, ds in zip(("train", "valid", "test"), num_samples, datasets):
        print(f"{name}: {n} samples requested, {0 if ds is None else len(ds)} built")
    print(f"index caches ready in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
