"""Concatenate Megatron datasets (``.bin/.idx`` pairs) into one, in the order given.

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document --output-prefix data/ab
    python tools/merge_datasets.py --input data/shards/ --output-prefix data/all   # every pair in a directory, sorted

All inputs must share one token dtype. The output appears under its final name only when complete.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List


from megatron_alcot.data.indexed_dataset import (IndexedDataset, IndexedDatasetBuilder,
                                                 IndexedDatasetError, get_bin_path, get_idx_path)


def resolve_prefixes(inputs: List[str]) -> List[str]:
    """Dataset prefixes from prefixes and/or directories (a directory contributes its pairs, sorted)."""
    prefixes: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, name[:-4]) for name in os.listdir(item)
                           if name.endswith(".idx") and not name.startswith("."))
            if not found:
                raise IndexedDatasetError(f"--input {item}: the directory holds no .idx files")
            for prefix in found:
                if not os.path.isfile(get_bin_path(prefix)):
                    raise IndexedDatasetError(f"--input {item}: {get_idx_path(prefix)} has no matching .bin")
            prefixes.extend(found)
        else:
            if item.endswith((".bin", ".idx")):
                item = item[:-4]
            prefixes.append(item)
    return prefixes


def merge(inputs: List[str], output_prefix: str) -> IndexedDataset:
    """Merge and return the opened result; raises IndexedDatasetError before writing on bad inputs."""
    prefixes = resolve_prefixes(inputs)
    if not prefixes:
        raise IndexedDatasetError("--input: give at least one dataset prefix or directory")
    datasets = [IndexedDataset(p) for p in prefixes]  # opening checks every pair
    dtypes = {str(ds.dtype.__name__) for ds in datasets}
    if len(dtypes) > 1:
        listing = ", ".join(f"{p} ({ds.dtype.__name__})" for p, ds in zip(prefixes, datasets))
        raise IndexedDatasetError(f"the datasets have different token dtypes: {listing}; re-run "
                                  "preprocessing with tokenizers of the same vocabulary size class")
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise IndexedDatasetError(f"--output-prefix {output_prefix} is also an input; choose another name")
    dtype = datasets[0].dtype
    del datasets
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    with IndexedDatasetBuilder(get_bin_path(output_prefix), dtype) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(get_idx_path(output_prefix))
    return IndexedDataset(output_prefix)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="dataset prefixes (without .bin/.idx), or a directory of them")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    try:
        merged = merge(args.input, args.output_prefix)
    except IndexedDatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.{{bin,idx}}: {len(merged)} sequences, "
          f"{len(merged.document_indices) - 1} documents", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
