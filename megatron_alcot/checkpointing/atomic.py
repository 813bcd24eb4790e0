"""Crash-safe file and directory writes for checkpoints.

    >>> write_file_synced(path, lambda f: torch.save(obj, f))   # write, flush, fsync
    >>> replace_text("ckpts/latest_checkpointed_iteration.txt", "1000")   # temp + fsync + rename
    >>> commit_directory("ckpts/iter_0001000.tmp", "ckpts/iter_0001000")  # fsync + rename

A reader sees either the old or the new file/directory, never a partial one.
"""
from __future__ import annotations

import os
import shutil
from typing import Callable

from megatron_alcot.utils.atomic import atomic_output, fsync_dir

TMP_SUFFIX = ".tmp"


def write_file_synced(path: str, write: Callable) -> int:
    """Create ``path``, call ``write(fileobj)``, flush and fsync it; returns the file size."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return os.path.getsize(path)


def replace_text(path: str, text: str) -> None:
    """Atomically replace a small text file: write a temporary file, fsync, rename over ``path``."""
    with atomic_output(path, "w") as f:
        f.write(text)


def commit_directory(tmp_dir: str, final_dir: str) -> None:
    """Rename a fully written ``tmp_dir`` to ``final_dir``.

    An existing ``final_dir`` (the same iteration saved again) is first moved aside and removed
    only after the new one is in place.
    """
    fsync_dir(tmp_dir)
    parent = os.path.dirname(os.path.abspath(final_dir))
    old = None
    if os.path.exists(final_dir):
        old = final_dir + ".old" + TMP_SUFFIX
        remove_tree(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    fsync_dir(parent)
    if old is not None:
        remove_tree(old)


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(directory: str) -> list:
    """Delete leftovers of interrupted saves (``*.tmp`` entries) in ``directory``; returns them."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        if TMP_SUFFIX in name:
            path = os.path.join(directory, name)
            if os.path.isdir(path):
                remove_tree(path)
            else:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            removed.append(path)
    return removed
