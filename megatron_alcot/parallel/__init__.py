"""Parallelism: the process-group registry (``parallel_state``), rank discovery (``launch``), the device
helper (``device``), ``tensor_parallel`` layers and ``pipeline`` schedules.

    from megatron_alcot.parallel import parallel_state, init_distributed
    info = init_distributed()            # torchrun / Slurm / Open MPI / single process
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
"""
from megatron_alcot.parallel import device, parallel_state
from megatron_alcot.parallel.launch import DistInfo, LaunchError, init_distributed

__all__ = ["parallel_state", "device", "init_distributed", "DistInfo", "LaunchError"]
