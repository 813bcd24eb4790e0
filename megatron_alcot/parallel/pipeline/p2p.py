"""Point-to-point messages between pipeline stages, with static shapes (docs/architecture.md §8).

A lap message carries one micro-batch's lap state around the ring of stages::

    spec = MessageSpec(batch=2, seq=32, hidden=64, dtype=torch.float32, device=dev)
    msg = LapMessage(LAP, micro_batch=0, step=k, hidden=h, active=a, reach=r, position_ids=pos)
    got = exchange(msg, next_rank, prev_rank, spec, group)   # send to next, receive from prev

    grad = exchange_grad(g, send_to, recv_from, spec, like=h, group=group)  # backward direction

Every message of a spec has the same shapes whatever the halting decisions (full sequence plus
masks; bubbles, finished micro-batches and the stop signal are zero payloads with a header), so
sender and receiver never disagree about sizes. Within a round every rank posts all its sends and
receives together (``batch_isend_irecv``) and waits for them, which cannot deadlock: induction on
rounds, each round's operations all have a match in the same round.

Wire layout: ``hidden [b, s, h]`` in the spec's dtype (the parameters' dtype), ``reach [b, s]`` fp32,
and one int64 vector ``[kind, micro_batch, step, dtype_code, active (b·s), position_ids (b·s)]``.
The hidden state is cast back to the sender's dtype on arrival (``dtype_code``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

BUBBLE, LAP, DONE, STOP = 0, 1, 2, 3
KIND_NAMES = ("bubble", "lap", "done", "stop")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_HEADER = 4


@dataclass(frozen=True)
class MessageSpec:
    """The static shape of every message of one schedule call."""

    batch: int
    seq: int                 # tokens of a lap (the expanded length for the pause baseline)
    hidden: int
    dtype: torch.dtype       # wire dtype of hidden states and their gradients
    device: torch.device

    def buffers(self) -> List[torch.Tensor]:
        b, s = self.batch, self.seq
        return [torch.empty(b, s, self.hidden, dtype=self.dtype, device=self.device),
                torch.empty(b, s, dtype=torch.float32, device=self.device),
                torch.empty(_HEADER + 2 * b * s, dtype=torch.int64, device=self.device)]


@dataclass
class LapMessage:
    """One lap state in flight; ``kind`` is BUBBLE, LAP, DONE (the micro-batch finished on the last
    stage) or STOP (the schedule ends). Only LAP carries a payload."""

    kind: int
    micro_batch: int = -1
    step: int = 0
    hidden: Optional[torch.Tensor] = None          # [b, s, h]
    active: Optional[torch.Tensor] = None          # [b, s] bool
    reach: Optional[torch.Tensor] = None           # [b, s] fp32
    position_ids: Optional[torch.Tensor] = None    # [b, s] int64 (None: 0..s-1)

    def __repr__(self) -> str:
        return f"LapMessage({KIND_NAMES[self.kind]}, micro_batch={self.micro_batch}, step={self.step})"


def pack(msg: LapMessage, spec: MessageSpec) -> List[torch.Tensor]:
    hidden, reach, meta = (t.zero_() for t in spec.buffers())
    meta[0], meta[1], meta[2] = msg.kind, msg.micro_batch, msg.step
    if msg.kind == LAP:
        expected = (spec.batch, spec.seq, spec.hidden)
        if tuple(msg.hidden.shape) != expected:
            raise RuntimeError(f"lap state of shape {tuple(msg.hidden.shape)} does not match the "
                               f"pipeline message shape {expected}; every micro-batch of one step must "
                               "have the same micro-batch size and sequence length")
        hidden.copy_(msg.hidden.detach())
        reach.copy_(msg.reach.detach())
        meta[3] = _DTYPES.index(msg.hidden.dtype)
        n = spec.batch * spec.seq
        meta[_HEADER:_HEADER + n] = msg.active.reshape(-1)
        positions = msg.position_ids
        if positions is None:
            positions = torch.arange(spec.seq, device=spec.device).expand(spec.batch, spec.seq)
        meta[_HEADER + n:] = positions.reshape(-1)
    return [hidden, reach, meta]


def unpack(tensors: Sequence[torch.Tensor], spec: MessageSpec) -> LapMessage:
    hidden, reach, meta = tensors
    header = meta[:_HEADER].tolist()
    kind, micro_batch, step, dtype_code = header
    if kind != LAP:
        return LapMessage(kind, micro_batch, step)
    b, s = spec.batch, spec.seq
    n = b * s
    active = meta[_HEADER:_HEADER + n].view(b, s).bool()
    positions = meta[_HEADER + n:].view(b, s).clone()
    return LapMessage(kind, micro_batch, step, hidden.to(_DTYPES[dtype_code]), active, reach, positions)


def _run(sends: Sequence[Tuple[torch.Tensor, int]], recvs: Sequence[Tuple[torch.Tensor, int]],
         group) -> None:
    ops = [dist.P2POp(dist.isend, t, peer, group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group) for t, peer in recvs]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def exchange(msg: Optional[LapMessage], send_to: Optional[int], recv_from: Optional[int],
             spec: MessageSpec, group=None) -> Optional[LapMessage]:
    """Send ``msg`` to global rank ``send_to`` and receive one message from ``recv_from`` (either
    may be None), posted together. Returns the received message or None."""
    sends = [(t, send_to) for t in pack(msg, spec)] if send_to is not None else []
    buffers = spec.buffers() if recv_from is not None else []
    _run(sends, [(t, recv_from) for t in buffers], group)
    return unpack(buffers, spec) if buffers else None


def exchange_grad(grad: Optional[torch.Tensor], send_to: Optional[int], recv_from: Optional[int],
                  spec: MessageSpec, like_dtype: torch.dtype = None, group=None) -> Optional[torch.Tensor]:
    """Backward direction: send the gradient of this stage's lap input ``[b, s, h]`` (None: zeros)
    and/or receive the gradient of this stage's lap output, returned in ``like_dtype``."""
    sends = []
    if send_to is not None:
        out = spec.buffers()[0]
        if grad is None:
            out.zero_()
        else:
            out.copy_(grad)
        sends = [(out, send_to)]
    buffer = spec.buffers()[0] if recv_from is not None else None
    _run(sends, [(buffer, recv_from)] if buffer is not None else [], group)
    if buffer is None:
        return None
    return buffer.to(like_dtype) if like_dtype is not None else buffer


def broadcast_spec(spec: Optional[MessageSpec], src: int, hidden: int, dtype: torch.dtype,
                   device: torch.device, group=None) -> MessageSpec:
    """Every stage learns the lap shape ``(batch, seq)`` from the first stage (one collective)."""
    shape = torch.zeros(2, dtype=torch.int64, device=device)
    if spec is not None:
        shape[0], shape[1] = spec.batch, spec.seq
    dist.broadcast(shape, src, group=group)
    return MessageSpec(int(shape[0]), int(shape[1]), hidden, dtype, device)
