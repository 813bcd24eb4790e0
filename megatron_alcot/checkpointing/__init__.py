"""Sharded, atomic, topology-aware checkpoints (see ``checkpoint.py``)."""
from megatron_alcot.checkpointing.checkpoint import (load_checkpoint, load_full_state_dict,
                                                     save_checkpoint)
from megatron_alcot.checkpointing.metadata import (CheckpointError, latest_iteration,
                                                   list_iterations)

__all__ = ["save_checkpoint", "load_checkpoint", "load_full_state_dict", "latest_iteration",
           "list_iterations", "CheckpointError"]
