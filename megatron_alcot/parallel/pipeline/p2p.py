"""Asynchronous point-to-point messages between pipeline stages, with static shapes (docs/architecture.md §8).

Model-free: tensors and ranks only. A schedule drives it in rounds::

    link = StageLink(spec, next_rank, prev_rank, group)
    link.post_round(fwd_msg, grad_msg)      # isend headers (+ payloads), irecv next round's headers
    fwd_head, bwd_head = link.headers()     # wait for the two headers: the one host read per round
    link.expect(fwd_head, bwd_head)         # irecv the payloads the headers announce
    msg = link.forward_payload()            # wait only now: LapMessage with hidden/active/reach
    grad = link.backward_payload()          # wait only now: [b, s, h] gradient

Every round each stage sends one 6-int header forward (to the next stage of the ring) and one
backward (to the previous), and receives one from each side. ``kind`` in the header says whether a
payload follows, so bubbles, finished micro-batches (DONE) and the stop signal carry none. Payloads
have the shapes of the spec whatever the halting decisions (full sequence plus masks), so sender and
receiver never disagree about sizes.

The header also carries the lap's host-known compaction sizes (active tokens, the most in one
row), so the receiving stage compacts without reading its mask. The header is the schedule's only
host read: the continue/DONE decision of the last stage (the
lap count, once per micro-batch, and one bit per lap) decides what the next stage runs. The four
header tensors of a round are read with one ``.tolist()``; on the receiving side payload receives
are posted as soon as the headers arrive and waited on only right before the compute that uses them.

Ordering: between one pair of ranks both sides post forward before backward, headers before
payloads, so the exchanges match in order on NCCL (which ignores tags) and by tag on gloo. Sends are
waited on one round later (their tensors stay referenced until then).

Wire layout of a lap: ``hidden [b, s, h]`` in the spec's wire dtype (the activation dtype: bf16
under bf16 autocast), ``reach [b, s]`` fp32, ``meta [2·b·s]`` int64 (active, position ids); a
gradient is ``[b, s, h]`` in the wire dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

BUBBLE, LAP, DONE, STOP, GRAD = 0, 1, 2, 3, 4
KIND_NAMES = ("bubble", "lap", "done", "stop", "grad")
HEADER = 6                      # [kind, micro_batch, lap, aux, size0, size1]
_TAG_FWD_HEAD, _TAG_BWD_HEAD, _TAG_HIDDEN, _TAG_REACH, _TAG_META, _TAG_GRAD = range(1, 7)


@dataclass(frozen=True)
class MessageSpec:
    """The static shape of every message of one schedule call."""

    batch: int
    seq: int                 # tokens of a lap (the expanded length for the pause baseline)
    hidden: int
    dtype: torch.dtype       # wire dtype of hidden states and their gradients
    device: torch.device

    def hidden_buffer(self) -> torch.Tensor:
        return torch.empty(self.batch, self.seq, self.hidden, dtype=self.dtype, device=self.device)


@dataclass
class LapMessage:
    """A header and, for LAP, one lap state. ``aux``: the lap count for DONE, the last round for
    STOP."""

    kind: int
    micro_batch: int = -1
    lap: int = 0
    hidden: Optional[torch.Tensor] = None          # [b, s, h]
    active: Optional[torch.Tensor] = None          # [b, s] bool
    reach: Optional[torch.Tensor] = None           # [b, s] fp32
    position_ids: Optional[torch.Tensor] = None    # [b, s] int64 (None: 0..s-1)
    aux: int = 0
    sizes: Optional[Tuple[int, int]] = None        # the lap's host-known sizes (LAP), if any

    def __repr__(self) -> str:
        return f"LapMessage({KIND_NAMES[self.kind]}, micro_batch={self.micro_batch}, lap={self.lap})"


@dataclass
class GradMessage:
    """Backward direction: the gradient of ``micro_batch``'s input to lap ``lap`` (GRAD), or
    nothing (BUBBLE)."""

    kind: int = BUBBLE
    micro_batch: int = -1
    lap: int = 0
    grad: Optional[torch.Tensor] = None            # [b, s, h]


Header = Tuple[int, int, int, int, int, int]


class StageLink:
    """The asynchronous sends and receives of one stage with its two ring neighbours."""

    def __init__(self, spec: MessageSpec, next_rank: int, prev_rank: int, group=None):
        self.spec, self.next, self.prev, self.group = spec, next_rank, prev_rank, group
        self._sends: List = []             # (work, tensor) of the last round, waited next round
        self._head_recv: List = []         # [(work, tensor)] x 2 (forward, backward) or []
        self._fwd_recv: List = []
        self._bwd_recv: List = []
        self._fwd_head: Optional[Header] = None

    # --- sending ---------------------------------------------------------------------------------
    def _header(self, kind: int, micro_batch: int, lap: int, aux: int,
                sizes: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        size0, size1 = sizes if sizes is not None else (-1, -1)
        return torch.tensor([kind, micro_batch, lap, aux, size0, size1], dtype=torch.int64,
                            device=self.spec.device)

    def _isend(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        self._sends.append((dist.isend(tensor, dst, group=self.group, tag=tag), tensor))

    def _irecv(self, tensor: torch.Tensor, src: int, tag: int):
        return dist.irecv(tensor, src, group=self.group, tag=tag), tensor

    def post_round(self, fwd: LapMessage, bwd: GradMessage) -> None:
        """Send this round's two messages and post the receives of the next round's headers."""
        self.wait_sends()
        self._isend(self._header(fwd.kind, fwd.micro_batch, fwd.lap, fwd.aux, fwd.sizes), self.next,
                    _TAG_FWD_HEAD)
        self._isend(self._header(bwd.kind, bwd.micro_batch, bwd.lap, 0), self.prev, _TAG_BWD_HEAD)
        self._head_recv = [self._irecv(torch.empty(HEADER, dtype=torch.int64, device=self.spec.device),
                                       self.prev, _TAG_FWD_HEAD),
                           self._irecv(torch.empty(HEADER, dtype=torch.int64, device=self.spec.device),
                                       self.next, _TAG_BWD_HEAD)]
        if fwd.kind == LAP:
            self._check_shape(fwd.hidden)
            positions = fwd.position_ids
            if positions is None:
                positions = torch.arange(self.spec.seq, device=self.spec.device).expand(self.spec.batch,
                                                                                        self.spec.seq)
            meta = torch.cat([fwd.active.reshape(-1).long(), positions.reshape(-1).long()])
            self._isend(fwd.hidden.detach().to(self.spec.dtype).contiguous(), self.next, _TAG_HIDDEN)
            self._isend(fwd.reach.detach().float().contiguous(), self.next, _TAG_REACH)
            self._isend(meta, self.next, _TAG_META)
        if bwd.kind == GRAD:
            self._isend(bwd.grad.detach().to(self.spec.dtype).contiguous(), self.prev, _TAG_GRAD)

    def wait_sends(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends = []

    def _check_shape(self, hidden: torch.Tensor) -> None:
        expected = (self.spec.batch, self.spec.seq, self.spec.hidden)
        if tuple(hidden.shape) != expected:
            raise RuntimeError(f"lap state of shape {tuple(hidden.shape)} does not match the pipeline "
                               f"message shape {expected}; every micro-batch of one iteration must have the "
                               "same micro-batch size and sequence length")

    # --- receiving -------------------------------------------------------------------------------
    def headers(self) -> Tuple[Header, Header]:
        """Wait for the two headers posted last round; one host read for both."""
        for work, _ in self._head_recv:
            work.wait()
        both = torch.cat([t for _, t in self._head_recv]).tolist()
        self._head_recv = []
        return tuple(both[:HEADER]), tuple(both[HEADER:])

    def expect(self, fwd_head: Header, bwd_head: Header) -> None:
        """Post the payload receives the headers announce (forward before backward)."""
        self._fwd_head = fwd_head
        if fwd_head[0] == LAP:
            b, s = self.spec.batch, self.spec.seq
            self._fwd_recv = [self._irecv(self.spec.hidden_buffer(), self.prev, _TAG_HIDDEN),
                              self._irecv(torch.empty(b, s, dtype=torch.float32, device=self.spec.device),
                                          self.prev, _TAG_REACH),
                              self._irecv(torch.empty(2 * b * s, dtype=torch.int64, device=self.spec.device),
                                          self.prev, _TAG_META)]
        if bwd_head[0] == GRAD:
            self._bwd_recv = [self._irecv(self.spec.hidden_buffer(), self.next, _TAG_GRAD)]

    def forward_payload(self) -> LapMessage:
        kind, micro_batch, lap, aux, size0, size1 = self._fwd_head
        sizes = (size0, size1) if size0 >= 0 else None
        if kind != LAP:
            return LapMessage(kind, micro_batch, lap, aux=aux)
        for work, _ in self._fwd_recv:
            work.wait()
        (_, hidden), (_, reach), (_, meta) = self._fwd_recv
        self._fwd_recv = []
        b, s = self.spec.batch, self.spec.seq
        active = meta[: b * s].view(b, s).bool()
        positions = meta[b * s:].view(b, s)
        return LapMessage(LAP, micro_batch, lap, hidden, active, reach, positions, aux, sizes)

    def backward_payload(self) -> Optional[torch.Tensor]:
        if not self._bwd_recv:
            return None
        (work, grad), = self._bwd_recv
        work.wait()
        self._bwd_recv = []
        return grad


def broadcast_spec(spec: Optional[MessageSpec], src: int, hidden: int, dtype: torch.dtype,
                   device: torch.device, group=None) -> MessageSpec:
    """Every stage learns the lap shape ``(batch, seq)`` from the first stage (one collective)."""
    shape = torch.zeros(2, dtype=torch.int64, device=device)
    if spec is not None:
        shape[0], shape[1] = spec.batch, spec.seq
    dist.broadcast(shape, src, group=group)
    return MessageSpec(int(shape[0]), int(shape[1]), hidden, dtype, device)
