"""Run a function on a gloo world of N CPU processes and collect each rank's return value.

    def body(rank, world_size, x):
        import torch.distributed as dist
        t = torch.tensor([x + rank]); dist.all_reduce(t); return t.item()

    results = run_distributed(body, 2, 10)   # [21, 21]

The body runs after ``init_process_group("gloo")`` on 127.0.0.1 with a free port and
``torch.set_num_threads(1)``; its return value must be picklable (tensors are fine).
An exception on any rank is re-raised in the parent with that rank's traceback.
"""
from __future__ import annotations

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


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        queue.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron_alcot.parallel import state
            state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            try:
                dist.barrier()
            except Exception:
                pass
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
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
