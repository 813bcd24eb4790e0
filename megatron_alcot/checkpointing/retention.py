"""Keep only the newest complete checkpoints (``--keep-last-checkpoints N``).

    removed = prune_checkpoints("ckpts", keep_last=3)   # rank 0, after a save: [iterations deleted]

What is kept and how a deletion stays crash-safe: docs/architecture.md §7.2.
"""
from __future__ import annotations

import os
from typing import List

from megatron_alcot.checkpointing import atomic
from megatron_alcot.checkpointing.metadata import iteration_dir, latest_iteration, list_iterations


def prune_checkpoints(save_dir: str, keep_last: int) -> List[int]:
    """Delete all but the ``keep_last`` newest complete checkpoints under ``save_dir`` (never the
    latest one); returns the deleted iterations, oldest first."""
    if keep_last < 1:
        raise ValueError(f"--keep-last-checkpoints must be >= 1, got {keep_last}")
    complete = list_iterations(save_dir)
    latest = latest_iteration(save_dir)
    keep = set(complete[-keep_last:]) | ({latest} if latest is not None else set())
    removed = []
    for iteration in complete:
        if iteration in keep:
            continue
        final = iteration_dir(save_dir, iteration)
        doomed = final + ".deleting" + atomic.TMP_SUFFIX
        atomic.remove_tree(doomed)
        os.replace(final, doomed)           # from here on, loading no longer sees it
        atomic.fsync_dir(save_dir)
        atomic.remove_tree(doomed)
        removed.append(iteration)
    return removed
