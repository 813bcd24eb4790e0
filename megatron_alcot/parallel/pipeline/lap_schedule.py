"""Pipeline-parallel forward-backward over micro-batches whose forward is several laps around the
ring of stages (docs/architecture.md §8).

    infos = forward_backward_pipelining_with_laps(
        forward_step_func=step, data_iterator=it, model=stage, num_microbatches=4,
        scale_loss=None, halting="learned", autocast_dtype=None)
    # last stage: one info per micro-batch, in micro-batch order; other stages: []

``forward_step_func(batch, model) -> (loss, info)`` is the PP = 1 step function: on the last stage
it is called once per micro-batch after its last lap, and its ``model(...)`` returns that
micro-batch's finished ``ModelOutput`` (the laps already ran). Without it the loss is
``out.loss`` and the info ``{"loss", "lm_loss", "latent_loss", "num_steps"}`` (detached).
``data_iterator`` yields ``{"tokens", "labels", "loss_mask"?, "position_ids"?}``; the first and last
stages need it, others may pass None (if given, it is advanced once per micro-batch too).

Forward, in rounds: in every round each stage runs at most one lap of one micro-batch and then the
ring shifts by one stage (:mod:`.p2p`). Stage 0 runs the lap state that came back from the last
stage (lap k >= 1, fed by ``end_lap``), or else injects the next micro-batch's step 0 (its
embedding), or else idles. A micro-batch that the last stage finishes (all tokens halted, or
ℓmax reached) comes back as a DONE message and frees its slot, so no stage runs its remaining laps.
With P stages up to P micro-batches are in flight, each lap taking one slot of the ring, like the
virtual stages of an interleaved schedule. After every micro-batch finished, stage 0 sends STOP.

Autograd is cut at lap boundaries: a lap's input and the keys/values of earlier laps are detached
leaves, and the last stage also cuts between the layers and ``end_lap`` (whose graph, with the
readout, reach and loss of all laps, is one small graph per micro-batch). Backward, after all
forwards (GPipe order; activations of all micro-batches are held, or of ``max_in_flight`` at a time
when the micro-batches are run group after group): in rounds, the last stage starts
a micro-batch from its loss, and each (micro-batch, lap, stage) runs its own backward, fed with the
gradient of its output (from the next stage; on the last stage the loss's plus the one stage 0's
next lap put on the fed-back hidden state) and the gradients later laps left on its keys/values.
Every stage knows the number of laps of every micro-batch by then, so the backward rounds are
computed identically on every rank and only real gradients travel.
"""
from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_alcot.model.attention import StepKV
from megatron_alcot.model.output import LapState, ModelOutput
from megatron_alcot.parallel import state
from megatron_alcot.parallel.pipeline import p2p
from megatron_alcot.parallel.pipeline.p2p import BUBBLE, DONE, LAP, STOP, LapMessage


@dataclass
class _Lap:
    """One lap of one micro-batch on this stage, kept for its backward."""

    x: torch.Tensor                        # input (a leaf unless it is stage 0's embedding)
    y: torch.Tensor                        # output of this stage's layers
    kv: Optional[StepKV]                   # this lap's keys/values (graph outputs)
    kv_leaf: Optional[StepKV]              # the detached copy later laps attend to
    y_leaf: Optional[torch.Tensor] = None  # last stage: ``end_lap``'s input
    h_next: Optional[torch.Tensor] = None  # last stage: the next lap's input (sent to stage 0)


@dataclass
class _MicroBatch:
    index: int
    batch: Optional[dict] = None
    laps: List[Optional[_Lap]] = field(default_factory=list)
    ctx: object = None                     # last stage: the method's accumulator
    pending: Optional[LapState] = None     # last stage: the next lap from ``end_lap`` (reach with graph)
    loss: Optional[torch.Tensor] = None


class _FinishedModel:
    """Stands in for the model in ``forward_step_func`` on the last stage: returns the output of
    laps that already ran."""

    def __init__(self, output: ModelOutput):
        self.output = output

    def __call__(self, *args, **kwargs) -> ModelOutput:
        return self.output


def default_forward_step(batch, model):
    out = model(batch["tokens"], labels=batch["labels"], loss_mask=batch.get("loss_mask"))
    info = {"loss": out.loss.detach(), "lm_loss": out.lm_loss.detach(),
            "latent_loss": out.latent_loss.detach(), "num_steps": out.num_steps}
    return out.loss, info


def _leaf_kv(kv: StepKV) -> StepKV:
    return StepKV(kv.order, kv.valid, [k.detach().requires_grad_() for k in kv.keys],
                  [v.detach().requires_grad_() for v in kv.values])


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def backward_rounds(lap_counts: Sequence[int], stages: int) -> List[List[Optional[Tuple[int, int]]]]:
    """``rounds[t][p]`` = (micro_batch, lap) stage p back-propagates in round t, or None.

    The last stage takes the lap before the one stage 0 finished in the round before (the
    gradient wraps around), else starts the next micro-batch from its last lap; stage p runs
    what stage p+1 ran one round earlier.

        >>> backward_rounds([2], 2)     # one micro-batch of two laps, two stages
        [[None, (0, 1)], [(0, 1), None], [None, (0, 0)], [(0, 0), None]]
    """
    waiting = deque(range(len(lap_counts)))
    last: List[Optional[Tuple[int, int]]] = []
    while True:
        t = len(last)
        back = last[t - stages] if t >= stages else None
        if back is not None and back[1] > 0:
            item = (back[0], back[1] - 1)
        elif waiting:
            m = waiting.popleft()
            item = (m, lap_counts[m] - 1)
        else:
            item = None
        in_flight = any(x is not None and x[1] > 0 for x in last[max(0, t - stages + 1):])
        if item is None and not in_flight:
            break
        last.append(item)
    rounds = []
    for t in range(len(last) + stages - 1):
        row = []
        for p in range(stages):
            r = t - (stages - 1 - p)
            row.append(last[r] if 0 <= r < len(last) else None)
        rounds.append(row)
    return rounds


class _LapPipeline:
    def __init__(self, model, forward_step_func, data_iterator, num_microbatches, forward_only,
                 scale_loss, halting, autocast_dtype, compact, lap_trace, loss_divisor, offset):
        self.stage = getattr(model, "module", model)
        self.method = self.stage.latent
        self.forward_step_func = forward_step_func or default_forward_step
        self.data_iterator = data_iterator
        self.n = num_microbatches
        self.loss_divisor = loss_divisor
        self.offset = offset               # global index of this call's micro-batch 0 (trace only)
        self.training = not forward_only
        self.scale_loss = scale_loss
        self.halting = halting
        self.autocast_dtype = autocast_dtype
        self.compact = compact
        self.trace = lap_trace
        self.P = state.get_pipeline_model_parallel_world_size()
        self.p = state.get_pipeline_model_parallel_rank()
        self.first, self.last = self.p == 0, self.p == self.P - 1
        self.next_rank = state.get_pipeline_model_parallel_next_rank()
        self.prev_rank = state.get_pipeline_model_parallel_prev_rank()
        self.group = state.get_pipeline_model_parallel_group()
        param = next(self.stage.parameters())
        self.device = param.device
        self.dtype = getattr(torch, self.stage.config.params_dtype)
        self.mbs: Dict[int, _MicroBatch] = {}
        self.infos: Dict[int, object] = {}
        self.spec: Optional[p2p.MessageSpec] = None
        if self.last and data_iterator is None:
            raise ValueError("the last pipeline stage needs a data_iterator (labels and loss mask)")
        if self.first and data_iterator is None:
            raise ValueError("the first pipeline stage needs a data_iterator (tokens)")

    # --- helpers ---------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _next_batch(self) -> Optional[dict]:
        if self.data_iterator is None:
            return None
        batch = next(self.data_iterator)
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                for k, v in batch.items()}

    def _halting(self, index: int):
        if isinstance(self.halting, (list, tuple)):
            return self.halting[index]
        return self.halting

    def _run_lap(self, mb: _MicroBatch, lap: LapState) -> torch.Tensor:
        if self.trace is not None:
            self.trace.append((self.offset + mb.index, lap.step))
        reuse = self.method.reuse_kv
        past = [rec.kv_leaf for rec in mb.laps] if reuse else ()
        with self._autocast():
            y, kv = self.stage.run_lap(lap, past, compact=self.compact)
        leaf = (_leaf_kv(kv) if self.training else kv) if reuse else None
        if self.training:
            mb.laps.append(_Lap(lap.hidden, y, kv, leaf))
        else:
            mb.laps.append(_Lap(None, None, None, leaf))
        return y

    def _lap_from(self, msg: LapMessage) -> LapState:
        hidden = _leaf(msg.hidden) if self.training else msg.hidden
        return LapState(hidden, msg.active, msg.reach, msg.step, msg.position_ids)

    # --- forward ---------------------------------------------------------------------------------
    def _inject(self, index: int) -> LapState:
        mb = self.mbs[index] = _MicroBatch(index, self._next_batch())
        with self._autocast():
            return self.method.first_lap(self.stage, mb.batch["tokens"], mb.batch.get("position_ids"))

    def _first_stage_work(self, incoming: Optional[LapMessage], injected: int):
        """(LapState to run or None, micro-batch index) for stage 0 in this round."""
        if incoming is not None and incoming.kind == LAP:
            return self._lap_from(incoming), incoming.micro_batch
        if injected < self.n:
            return self._inject(injected), injected
        return None, -1

    def _forward_lap(self, mb: _MicroBatch, lap: LapState) -> LapMessage:
        """Run this stage's lap; the message for the next stage."""
        y = self._run_lap(mb, lap)
        if not self.last:
            return LapMessage(LAP, mb.index, lap.step, y, lap.active, lap.reach, lap.position_ids)
        if lap.step == 0:
            with self._autocast():
                mb.ctx = self.method.begin(self.stage, lap, labels=mb.batch["labels"],
                                           loss_mask=mb.batch.get("loss_mask"),
                                           halting=self._halting(mb.index))
        else:
            lap = LapState(lap.hidden, lap.active, mb.pending.reach, lap.step, lap.position_ids)
        rec = mb.laps[-1]
        rec.y_leaf = _leaf(y) if self.training else y
        with self._autocast():
            nxt = self.method.end_lap(self.stage, mb.ctx, lap, rec.y_leaf)
        if nxt is None:
            with self._autocast():
                out = self.method.finish(self.stage, mb.ctx)
            mb.loss, self.infos[mb.index] = self.forward_step_func(mb.batch, _FinishedModel(out))
            mb.ctx = mb.pending = None
            return LapMessage(DONE, mb.index, lap.step)
        rec.h_next = nxt.hidden
        mb.pending = nxt
        return LapMessage(LAP, mb.index, nxt.step, nxt.hidden, nxt.active, nxt.reach, nxt.position_ids)

    def _setup_spec(self) -> Optional[LapState]:
        """Stage 0 prepares micro-batch 0 to learn the lap shape; every stage receives it."""
        lap0 = None
        spec = None
        if self.first:
            lap0 = self._inject(0)
            b, s = lap0.active.shape
            spec = p2p.MessageSpec(b, s, self.stage.config.hidden_size, self.dtype, self.device)
        self.spec = p2p.broadcast_spec(spec, state.get_pipeline_model_parallel_first_rank(),
                                       self.stage.config.hidden_size, self.dtype, self.device,
                                       self.group)
        return lap0

    def forward(self) -> None:
        lap0 = self._setup_spec()
        if self.first:
            self._forward_first(lap0)
        else:
            self._forward_other()

    def _forward_first(self, lap0: LapState) -> None:
        injected, finished = 1, 0
        lap, index = lap0, 0
        while True:
            if lap is not None:
                out = self._forward_lap(self.mbs[index], lap)
            elif finished == self.n:
                out = LapMessage(STOP)
            else:
                out = LapMessage(BUBBLE)
            if out.kind == STOP:
                p2p.exchange(out, self.next_rank, None, self.spec, self.group)
                while p2p.exchange(None, None, self.prev_rank, self.spec, self.group).kind != STOP:
                    pass
                return
            incoming = p2p.exchange(out, self.next_rank, self.prev_rank, self.spec, self.group)
            if incoming.kind == DONE:
                finished += 1
            lap, index = self._first_stage_work(incoming, injected)
            if index == injected:
                injected += 1

    def _forward_other(self) -> None:
        incoming = LapMessage(BUBBLE)
        while True:
            if incoming.kind == STOP:
                p2p.exchange(incoming, self.next_rank, None, self.spec, self.group)
                return
            out = LapMessage(BUBBLE)
            if incoming.kind == LAP:
                if incoming.step == 0:
                    self.mbs[incoming.micro_batch] = _MicroBatch(incoming.micro_batch, self._next_batch())
                out = self._forward_lap(self.mbs[incoming.micro_batch], self._lap_from(incoming))
            incoming = p2p.exchange(out, self.next_rank, self.prev_rank, self.spec, self.group)

    # --- backward --------------------------------------------------------------------------------
    def backward(self) -> None:
        counts = [len(self.mbs[m].laps) for m in range(self.n)]
        received = None
        for row in backward_rounds(counts, self.P):
            item = row[self.p]
            grad_in = self._backward_lap(item, received) if item is not None else None
            sends = item is not None and (not self.first or item[1] > 0)
            upstream = row[(self.p + 1) % self.P]     # what the stage after me runs this round
            expect = upstream is not None and (self.p + 1 < self.P or upstream[1] > 0)
            received = p2p.exchange_grad(grad_in, self.prev_rank if sends else None,
                                         self.next_rank if expect else None, self.spec,
                                         group=self.group)

    def _backward_lap(self, item: Tuple[int, int], grad_out: Optional[torch.Tensor]):
        """Backward of (micro-batch, lap) on this stage; returns the gradient of its input."""
        m, k = item
        mb = self.mbs[m]
        rec = mb.laps[k]
        if self.last:
            if k == len(mb.laps) - 1:
                loss = mb.loss / self.loss_divisor
                if self.scale_loss is not None:
                    loss = self.scale_loss(loss)
                loss.backward(retain_graph=True)
            else:
                torch.autograd.backward([rec.h_next], [grad_out.to(rec.h_next.dtype)], retain_graph=True)
            dy = rec.y_leaf.grad
        else:
            dy = grad_out
        outputs, grads = [rec.y], [torch.zeros_like(rec.y) if dy is None else dy.to(rec.y.dtype)]
        if rec.kv_leaf is not None:
            for out, leaf in zip(rec.kv.keys + rec.kv.values, rec.kv_leaf.keys + rec.kv_leaf.values):
                if leaf.grad is not None:
                    outputs.append(out)
                    grads.append(leaf.grad)
        if outputs[0].requires_grad:
            torch.autograd.backward(outputs, grads)
        mb.laps[k] = None
        if k == 0:
            mb.batch = mb.ctx = mb.loss = None
        return rec.x.grad if rec.x.is_leaf else None

    def results(self) -> List:
        return [self.infos[m] for m in range(self.n)] if self.last else []


def forward_backward_pipelining_with_laps(*, forward_step_func: Optional[Callable] = None,
                                          data_iterator: Optional[Iterator], model: torch.nn.Module,
                                          num_microbatches: int, forward_only: bool = False,
                                          scale_loss: Optional[Callable] = None, halting="learned",
                                          autocast_dtype: Optional[torch.dtype] = None,
                                          compact: bool = True, max_in_flight: Optional[int] = None,
                                          lap_trace: Optional[list] = None) -> List:
    """Run the forward (and unless ``forward_only`` the backward) of ``num_microbatches`` on this
    stage. Gradients accumulate into the parameters' ``.grad`` (each loss divided by
    ``num_microbatches``, then ``scale_loss``); with a data-parallel wrapper the whole call runs under
    ``no_sync`` and the caller's ``finish_grad_sync`` reduces. ``halting``: one mode or callable for
    all micro-batches, or a list with one per micro-batch. ``max_in_flight``: how many
    micro-batches' activations are held at once (their forwards, then their backwards, group after
    group); None: all of them (GPipe order, the fewest bubbles). ``lap_trace``: a list that receives
    ``(micro_batch, step)`` for every lap this stage runs.

    Returns the last stage's infos in micro-batch order; ``[]`` on the other stages.
    """
    if state.get_pipeline_model_parallel_world_size() < 2:
        raise ValueError("the lap pipeline schedule needs --pipeline-model-parallel-size >= 2; "
                         "use training.schedules.forward_backward_no_pipelining")
    if isinstance(halting, (list, tuple)) and len(halting) != num_microbatches:
        raise ValueError(f"halting has {len(halting)} entries for {num_microbatches} micro-batches")
    group = max(1, max_in_flight or num_microbatches)
    no_sync = getattr(model, "no_sync", None)
    sync_ctx = no_sync() if (no_sync is not None and not forward_only) else contextlib.nullcontext()
    grad_ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
    infos = []
    with sync_ctx, grad_ctx:
        for start in range(0, num_microbatches, group):
            count = min(group, num_microbatches - start)
            part = halting[start:start + count] if isinstance(halting, (list, tuple)) else halting
            run = _LapPipeline(model, forward_step_func, data_iterator, count, forward_only, scale_loss,
                               part, autocast_dtype, compact, lap_trace, num_microbatches, start)
            run.forward()
            if not forward_only:
                run.backward()
            infos += run.results()
    return infos


def infos_from_last_stage(infos: List[torch.Tensor], numel: int, device=None) -> List[torch.Tensor]:
    """The sum of the last stage's per-micro-batch info vectors (float64, length ``numel``), on
    every stage of the pipeline, as a one-element list (one broadcast over the PP group)."""
    device = device or torch.device("cpu")
    total = torch.zeros(numel, dtype=torch.float64, device=device)
    if infos:
        total += torch.stack([i.to(device, torch.float64) for i in infos]).sum(0)
    if state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(total, state.get_pipeline_model_parallel_last_rank(),
                       group=state.get_pipeline_model_parallel_group())
    return [total]
