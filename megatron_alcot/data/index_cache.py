"""On-disk cache of dataset indices: ``.npy`` files named by the MD5 of a JSON description.

Layout inside the cache directory (``--data-cache-path``; default ``cache/GPTDataset_indices`` next
to the dataset prefix), Megatron's naming::

    {md5}-GPTDataset-train-description.txt      the JSON description that was hashed
    {md5}-GPTDataset-train-document_index.npy
    {md5}-GPTDataset-train-sample_index.npy
    {md5}-GPTDataset-train-shuffle_index.npy

Every file is written atomically (temporary name, fsync, rename) and the description last, so a
crash never leaves a cache that looks complete. Under ``torch.distributed`` only global rank 0
builds; the other ranks wait for it (a broadcast that also carries rank 0's error, so nobody hangs
on a failed build) and then memory-map the files. A rank that still misses the files afterwards
(node-local cache directories) builds them itself.

    arrays = build_or_load_indices("cache_dir", "GPTDataset", "train", description,
                                   ("document_index", "sample_index", "shuffle_index"), build_fn)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable, Dict, Optional, Sequence

import numpy
import torch

from megatron_alcot.config import ConfigError
from megatron_alcot.utils.atomic import commit, remove_quietly, temp_path_for

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1


def make_description(class_name: str, **fields) -> str:
    """The JSON text that identifies a set of indices (its MD5 names the files)."""
    fields = {"class": class_name, "format": CACHE_FORMAT_VERSION, **fields}
    if fields.get("dataset_path"):
        fields["dataset_path"] = os.path.realpath(fields["dataset_path"])
    return json.dumps(fields, indent=4, sort_keys=False, default=str)


def description_hash(description: str) -> str:
    return hashlib.md5(description.encode("utf-8"), usedforsecurity=False).hexdigest()


def cache_paths(cache_dir: str, class_name: str, split: str, description: str,
                names: Sequence[str]) -> Dict[str, str]:
    """``{name: path}`` for every array plus ``"description"``."""
    base = f"{description_hash(description)}-{class_name}-{split}"
    paths = {name: os.path.join(cache_dir, f"{base}-{name}.npy") for name in names}
    paths["description"] = os.path.join(cache_dir, f"{base}-description.txt")
    return paths


def cache_complete(paths: Dict[str, str]) -> bool:
    return all(os.path.isfile(p) for p in paths.values())


def save_arrays(paths: Dict[str, str], arrays: Dict[str, numpy.ndarray], description: str) -> None:
    """Write each array, then the description, each atomically."""
    os.makedirs(os.path.dirname(paths["description"]), exist_ok=True)
    for name, array in arrays.items():
        _atomic_write(paths[name], lambda f, a=array: numpy.save(f, a, allow_pickle=False))
    _atomic_write(paths["description"], lambda f: f.write(description.encode("utf-8")))


def _atomic_write(path: str, write: Callable) -> None:
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
        commit(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def load_arrays(paths: Dict[str, str], names: Sequence[str]) -> Dict[str, numpy.ndarray]:
    """Memory-map the cached arrays read-only."""
    out = {}
    for name in names:
        try:
            out[name] = numpy.load(paths[name], mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ConfigError(f"{paths[name]}: unreadable cached index ({e}); delete the files "
                              f"{os.path.basename(paths[name]).rsplit('-', 1)[0]}-* and rerun") from None
    return out


def _rank_and_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def build_or_load_indices(cache_dir: Optional[str], class_name: str, split: str, description: str,
                          names: Sequence[str], build: Callable[[], Dict[str, numpy.ndarray]]
                          ) -> Dict[str, numpy.ndarray]:
    """Load the cached arrays, building (rank 0) and saving them first on a cache miss.

    Must be called by every rank in the same order when ``torch.distributed`` is initialised.
    ``cache_dir=None`` builds in memory on every rank and saves nothing.
    """
    if cache_dir is None:
        return build()
    paths = cache_paths(cache_dir, class_name, split, description, names)
    rank, world = _rank_and_world()
    error = None
    if rank == 0 and not cache_complete(paths):
        logger.info("building %s %s indices into %s", class_name, split, cache_dir)
        try:
            save_arrays(paths, build(), description)
        except OSError as e:
            error = ConfigError(
                f"cannot write the {class_name} {split} index cache to {cache_dir} ({e.strerror or e}); "
                "point --data-cache-path at a writable directory")
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = e
    if world > 1:
        message = [None if error is None else f"{type(error).__name__}: {error}"]
        torch.distributed.broadcast_object_list(message, src=0)
        if message[0] is not None and rank != 0:
            raise RuntimeError(f"rank 0 failed to build the {class_name} {split} indices: {message[0]}")
    if error is not None:
        raise error
    if not cache_complete(paths):
        logger.warning("rank %d: %s %s indices not found in %s after rank 0 built them (cache "
                       "directory not shared?); building them here", rank, class_name, split, cache_dir)
        arrays = build()
        try:
            save_arrays(paths, arrays, description)
        except OSError:
            return arrays
    return load_arrays(paths, names)
