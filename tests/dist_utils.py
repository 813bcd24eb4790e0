"""Run a function on a gloo world of N CPU processes and collect each rank's return value.

    def body(rank, world_size, x):
        import torch.distributed as dist
        t = torch.tensor([x + rank]); dist.all_reduce(t); return t.item()

    results = run_distributed(body, 2, 10)   # [21, 21]

The body runs after ``init_process_group("gloo")`` on 127.0.0.1 with a free port and
``torch.set_num_threads(1)``; its return value must be picklable (tensors are fine).
An exception on any rank is re-raised in the parent with that rank's traceback.

Every body runs under :func:`collective_device_guard`: a collective whose tensor lives on a device
the backend cannot take (a CPU tensor under NCCL) fails with the call's name and the device, so a
gloo test on a GPU machine, or an NCCL run of the same body, catches what NCCL would reject.
``run_distributed(body, 2, nccl_like=True)`` is stricter: every collective tensor must be on
``parallel.device.get_device()``, the device the code runs on (as NCCL would need on a GPU node).

    with collective_device_guard(nccl_like=True):
        dist.all_reduce(torch.zeros(1, device="meta"))   # AssertionError: ... meta, expected cpu
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Collectives whose tensor arguments the guard checks (positional or keyword, lists included).
# Not isend / irecv: dist.P2POp accepts only the original functions (batch_isend_irecv).
_GUARDED = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
            "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
            "send", "recv", "scatter", "gather")


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def _check_device(name, tensor, nccl_like):
    from megatron_alcot.parallel import device as device_lib
    backend = dist.get_backend() if dist.is_initialized() else "gloo"
    if backend == "nccl" or nccl_like:
        expected = device_lib.get_device()
        ok = tensor.device.type == expected.type
    else:
        expected = "cpu or cuda"
        ok = tensor.device.type in ("cpu", "cuda")
    assert ok, (f"dist.{name} got a tensor on {tensor.device} ({tuple(tensor.shape)}, "
                f"{tensor.dtype}), expected {expected} under the {backend} backend"
                f"{' (nccl_like guard)' if nccl_like and backend != 'nccl' else ''}: build "
                "collective tensors on megatron_alcot.training.signals.collective_device() or the "
                "model's device")


@contextlib.contextmanager
def collective_device_guard(nccl_like: bool = False):
    """Within the block, ``torch.distributed``'s collectives fail on a tensor the backend cannot
    take; with ``nccl_like`` on any tensor that is not on ``parallel.device.get_device()``."""
    originals = {name: getattr(dist, name) for name in _GUARDED if hasattr(dist, name)}

    def wrap(name, fn):
        def guarded(*args, **kwargs):
            for t in _tensors(list(args) + list(kwargs.values())):
                _check_device(name, t, nccl_like)
            return fn(*args, **kwargs)
        guarded.__wrapped__ = fn
        return guarded

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _worker(rank, world_size, port, fn, args, queue, nccl_like=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        with collective_device_guard(nccl_like):
            out = fn(rank, world_size, *args)
        queue.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron_alcot.parallel import parallel_state
            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            try:
                dist.barrier()
            except Exception:
                pass
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0, nccl_like: bool = False):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, nccl_like))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 5)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def _hard_exit_worker(rank, world_size, port, fn, args, env, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), **env)
    torch.set_num_threads(1)
    code = 0
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        with collective_device_guard():
            queue.put((rank, "ok", fn(rank, world_size, *args)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
        code = 1
    # os._exit skips the queue's exit handler: without close + join_thread, a result still in the
    # feeder thread (larger than the pipe buffer) is lost or cut, and the parent waits forever.
    queue.close()
    queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_distributed_hard_exit(fn, world_size: int, *args, env=None, timeout: float = 300.0):
    """Like :func:`run_distributed`, but each worker ends with barrier, ``destroy_process_group``
    and ``os._exit`` (DeepSpeed ZeRO-3 can abort in interpreter shutdown otherwise). Return values
    must not be tensors backed by shared memory that dies with the worker: return plain values or
    ``torch.save`` bytes."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_hard_exit_worker,
                         args=(r, world_size, port, fn, args, dict(env or {}), queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
