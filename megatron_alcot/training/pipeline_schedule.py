"""Pipeline-parallel forward-backward over micro-batches whose forward is several laps around the
ring of stages: 1F1B with laps (the default) or GPipe order (docs/architecture.md §8).

    infos = forward_backward_pipelining_with_laps(
        forward_step_func=step, data_iterator=it, model=stage, num_microbatches=8,
        scale_loss=None, halting="learned", autocast_dtype=None, order="1f1b", max_in_flight=None)
    # last stage: one info per micro-batch, in micro-batch order; other stages: []
    max_in_flight_microbatches(pipeline_size=4, stage=0, num_microbatches=32)   # == 8

``forward_step_func(batch, model) -> (loss, info)`` is the PP = 1 step function: on the last stage
it is called once per micro-batch after its last lap, and its ``model(...)`` returns that
micro-batch's finished ``ModelOutput`` (the laps already ran). ``data_iterator`` yields
``{"tokens", "labels", "loss_mask"?, "position_ids"?}``; the first and last stages need it, others may
pass None (if given, it is advanced once per micro-batch too).

Rounds. In every round each stage runs at most one forward lap and at most one backward lap, then
sends the forward result to the next stage of the ring and the input gradient to the previous one
(:mod:`megatron_alcot.parallel.pipeline.p2p`, asynchronous, headers first).

* Forward: stage 0 runs the lap that came back from the last stage (lap k >= 1 of a micro-batch that
  has not halted), else injects the next micro-batch (its embedding) if fewer than ``max_in_flight``
  (default 2·P) micro-batches are alive, else idles. Stage p > 0 runs what stage p - 1 sent. After each lap the last
  stage's latent method decides: the next lap goes back to stage 0, or the micro-batch is finished
  (all tokens halted, or ℓmax reached), its loss is computed and a DONE header carrying the lap count
  frees the ring slot on stage 0.
* Backward: a finished micro-batch joins the last stage's backward queue (1F1B: at once; GPipe:
  once every micro-batch finished). The last stage back-propagates the gradient that wrapped around
  from stage 0 (lap k -> lap k - 1 of the same micro-batch) if any, else starts the next queued
  micro-batch from its loss and last lap. Stage p < P - 1 back-propagates what stage p + 1 sent.
  Later laps of a micro-batch always run their backward first, so the gradients they leave on
  earlier laps' keys/values are complete. Only the last stage needs the lap count; the other stages
  follow the gradient headers.
* A micro-batch is alive on a stage from its first forward lap there to its lap-0 backward there;
  the lap-0 backward on stage 0 comes last, so counting on stage 0 bounds every stage. With laps a
  micro-batch keeps activations on every stage for all its laps, which is why the bound is the same
  on every stage (:func:`max_in_flight_microbatches`).
* Stop: when stage 0 has nothing left it sends STOP with the last round's number around the ring;
  every stage exchanges headers up to that round and returns.

Autograd is cut at lap boundaries: a lap's input and the keys/values of earlier laps are detached
leaves, and the last stage also cuts between the layers and ``end_lap`` (whose graph, with the
readout, reach and loss of all laps, is one small graph per micro-batch).

Autocast: one region of the outer schedule call holds the autocast weight cache, so every lap of
every micro-batch in the step uses one bf16 copy of each weight (:func:`weight_cast_region`).
"""
from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_alcot.model.attention import LapKV
from megatron_alcot.model.output import LapState, ModelOutput
from megatron_alcot.parallel import parallel_state
from megatron_alcot.parallel.pipeline import p2p
from megatron_alcot.parallel.pipeline.p2p import BUBBLE, DONE, GRAD, LAP, STOP, GradMessage, LapMessage

PIPELINE_ORDERS = ("1f1b", "gpipe")


def max_in_flight_microbatches(pipeline_size: int, stage: int, num_microbatches: int,
                               limit: Optional[int] = None, order: str = "1f1b") -> int:
    """How many micro-batches hold activations at once on ``stage`` (memory planning).

        max_in_flight_microbatches(4, 0, 32)                  # 1F1B: 8
        max_in_flight_microbatches(4, 3, 32, order="gpipe")   # 32
        max_in_flight_microbatches(4, 0, 32, limit=4)         # --pipeline-max-in-flight 4: 4

    1F1B: ``min(m, limit or 2·P)`` on every stage; GPipe order: ``m``. The lap ring keeps a
    micro-batch's lap states on every stage until its backward reaches that stage's lap 0, so the
    last stages hold as many micro-batches as the first (without laps Megatron's 1F1B holds
    ``P - stage``). Why 2·P by default: each round pairs one forward and one backward lap per stage,
    and a round starts only when both ring neighbours finished the previous one, so a micro-batch
    occupies a slot of the forward ring (P slots) and later one of the backward ring (P slots). With
    2·P alive the idle fraction of the schedule equals the analytic (P-1)/(m+P-1) without laps and is
    below it with laps; with P alive one ring runs half empty (docs/bench_pipeline.md).
    """
    if order not in PIPELINE_ORDERS:
        raise ValueError(f"pipeline order {order!r}: use one of {', '.join(PIPELINE_ORDERS)}")
    if not 0 <= stage < pipeline_size:
        raise ValueError(f"stage {stage} outside a pipeline of {pipeline_size} stages")
    if order == "gpipe":
        return num_microbatches
    return max(1, min(num_microbatches, limit or 2 * pipeline_size))


def weight_cast_region(device: torch.device, dtype: Optional[torch.dtype]):
    """A region that keeps the autocast weight cache alive across the autocast regions inside it:
    every micro-batch and lap in it shares one low-precision copy of each weight (autocast drops
    its cache when the outermost region exits). Autocast itself stays off in the region, so
    backward and communication run outside it.

        with weight_cast_region(device, torch.bfloat16):
            for mb in micro_batches:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = model(mb)
                loss.backward()
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


@dataclass
class _Lap:
    """One lap of one micro-batch on this stage, kept for its backward."""

    x: torch.Tensor                        # input (a leaf unless it is stage 0's embedding)
    y: torch.Tensor                        # output of this stage's layers
    kv: Optional[LapKV]                    # this lap's keys/values (graph outputs)
    kv_leaf: Optional[LapKV]               # the detached copy later laps attend to
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


@dataclass
class ScheduleStats:
    """What one call did on this stage (filled when ``stats`` is passed)."""

    rounds: int = 0
    forward_laps: int = 0
    backward_laps: int = 0
    max_in_flight: int = 0                 # micro-batches alive on this stage at once
    busy_s: float = 0.0                    # wall time in lap compute (forward + backward)
    total_s: float = 0.0
    forward_s: float = 0.0
    backward_s: float = 0.0
    slots: List[Tuple[int, int]] = field(default_factory=list)   # per round: (forward lap?, backward lap?)


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


def _leaf_kv(kv: LapKV) -> LapKV:
    return LapKV(kv.order, kv.valid, [k.detach().requires_grad_() for k in kv.keys],
                  [v.detach().requires_grad_() for v in kv.values])


class _LapPipeline:
    def __init__(self, model, forward_step_func, data_iterator, num_microbatches, forward_only,
                 scale_loss, halting, autocast_dtype, compact, lap_trace, order, max_in_flight, stats):
        self.stage = model
        self.method = self.stage.latent
        self.forward_step_func = forward_step_func or default_forward_step
        self.data_iterator = data_iterator
        self.n = num_microbatches
        self.training = not forward_only
        self.scale_loss = scale_loss
        self.halting = halting
        self.autocast_dtype = autocast_dtype
        self.compact = compact
        self.trace = lap_trace
        self.stats = stats if stats is not None else ScheduleStats()
        self.P = parallel_state.get_pipeline_model_parallel_world_size()
        self.p = parallel_state.get_pipeline_model_parallel_rank()
        self.first, self.last = self.p == 0, self.p == self.P - 1
        self.gpipe = order == "gpipe"
        self.limit = max_in_flight_microbatches(self.P, self.p, self.n, max_in_flight, order)
        self.group = parallel_state.get_pipeline_model_parallel_group()
        param = next(self.stage.parameters())
        self.device = param.device
        self.dtype = getattr(torch, self.stage.config.params_dtype)
        self.wire_dtype = autocast_dtype or self.dtype
        self.mbs: Dict[int, _MicroBatch] = {}
        self.infos: Dict[int, object] = {}
        self.alive = 0
        if (self.last or self.first) and data_iterator is None:
            raise ValueError(f"pipeline stage {self.p} (the {'first' if self.first else 'last'}) needs a "
                             "data_iterator (tokens, labels and loss mask)")

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

    def _new_mb(self, index: int) -> _MicroBatch:
        mb = self.mbs[index] = _MicroBatch(index, self._next_batch())
        self.alive += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.alive)
        return mb

    def _lap_from(self, msg: LapMessage) -> LapState:
        hidden = msg.hidden.to(self.dtype)
        if self.training:
            hidden = hidden.detach().requires_grad_()
        return LapState(hidden, msg.active, msg.reach, msg.lap, msg.position_ids, sizes=msg.sizes)

    # --- forward lap -----------------------------------------------------------------------------
    def _run_lap(self, mb: _MicroBatch, lap: LapState) -> torch.Tensor:
        if self.trace is not None:
            self.trace.append((mb.index, lap.k))
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

    def _inject(self, index: int) -> LapState:
        mb = self._new_mb(index)
        with self._autocast():
            return self.method.first_lap(self.stage, mb.batch["tokens"], mb.batch.get("position_ids"))

    def _forward_lap(self, mb: _MicroBatch, lap: LapState) -> LapMessage:
        """Run this stage's lap; the message for the next stage."""
        y = self._run_lap(mb, lap)
        if not self.last:
            return LapMessage(LAP, mb.index, lap.k, y, lap.active, lap.reach, lap.position_ids,
                              sizes=lap.sizes)
        if lap.k == 0:
            with self._autocast():
                mb.ctx = self.method.begin(self.stage, lap, labels=mb.batch["labels"],
                                           loss_mask=mb.batch.get("loss_mask"),
                                           halting=self._halting(mb.index))
        else:
            lap = LapState(lap.hidden, lap.active, mb.pending.reach, lap.k, lap.position_ids, sizes=lap.sizes)
        rec = mb.laps[-1]
        rec.y_leaf = y.detach().requires_grad_() if self.training else y
        with self._autocast():
            nxt = self.method.end_lap(self.stage, mb.ctx, lap, rec.y_leaf)
        if nxt is None:
            with self._autocast():
                out = self.method.finish(self.stage, mb.ctx)
            mb.loss, self.infos[mb.index] = self.forward_step_func(mb.batch, _FinishedModel(out))
            mb.ctx = mb.pending = None
            return LapMessage(DONE, mb.index, lap.k, aux=len(mb.laps))
        rec.h_next = nxt.hidden
        mb.pending = nxt
        return LapMessage(LAP, mb.index, nxt.k, nxt.hidden, nxt.active, nxt.reach, nxt.position_ids,
                          sizes=nxt.sizes)

    # --- backward lap ----------------------------------------------------------------------------
    def _backward_lap(self, m: int, k: int, grad_out: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Backward of lap ``k`` of micro-batch ``m`` on this stage; the gradient of its input."""
        mb = self.mbs[m]
        rec = mb.laps[k]
        if self.last:
            if k == len(mb.laps) - 1:
                loss = mb.loss / self.n
                if self.scale_loss is not None:
                    loss = self.scale_loss(loss)
                loss.backward(retain_graph=k > 0)
            else:
                torch.autograd.backward([rec.h_next], [grad_out.to(rec.h_next.dtype)],
                                        retain_graph=k > 0)
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
            del self.mbs[m]
            self.alive -= 1
        return rec.x.grad if rec.x.is_leaf else None

    # --- rounds ----------------------------------------------------------------------------------
    def _setup(self) -> Optional[LapState]:
        """Stage 0 prepares micro-batch 0 to learn the lap shape; every stage receives it."""
        lap0, spec = None, None
        hidden = self.stage.config.hidden_size
        if self.first:
            lap0 = self._inject(0)
            b, s = lap0.active.shape
            spec = p2p.MessageSpec(b, s, hidden, self.wire_dtype, self.device)
        spec = p2p.broadcast_spec(spec, parallel_state.get_pipeline_model_parallel_first_rank(), hidden,
                                  self.wire_dtype, self.device, self.group)
        self.link = p2p.StageLink(spec, parallel_state.get_pipeline_model_parallel_next_rank(),
                                  parallel_state.get_pipeline_model_parallel_prev_rank(), self.group)
        return lap0

    def run(self) -> None:
        start = time.perf_counter()
        lap0 = self._setup()
        injected = 1 if self.first else 0
        done = 0                                   # last stage: finished micro-batches
        ready: deque = deque()                     # last stage: finished, backward not started
        held: List[int] = []                       # last stage (GPipe): finished, waiting for all
        fwd_head, bwd_head = (BUBBLE, -1, 0, 0, -1, -1), (BUBBLE, -1, 0, 0, -1, -1)
        final_round: Optional[int] = None
        r = 0
        while True:
            if r > 0:
                fwd_head, bwd_head = self.link.headers()
                self.link.expect(fwd_head, bwd_head)
            if fwd_head[0] == STOP and final_round is None:
                final_round = fwd_head[3]
            # forward slot (the payload wait is not counted as busy time)
            incoming = self.link.forward_payload() if r > 0 else LapMessage(BUBBLE)
            t0 = time.perf_counter()
            out = LapMessage(BUBBLE)
            if final_round is not None:
                out = LapMessage(STOP, aux=final_round)
            elif self.first:
                if incoming.kind == DONE and not self.training:
                    self.alive -= 1
                    del self.mbs[incoming.micro_batch]
                if incoming.kind == LAP:
                    out = self._forward_lap(self.mbs[incoming.micro_batch], self._lap_from(incoming))
                elif r == 0:
                    out = self._forward_lap(self.mbs[0], lap0)
                elif injected < self.n and self.alive < self.limit:
                    lap = self._inject(injected)
                    out = self._forward_lap(self.mbs[injected], lap)
                    injected += 1
            else:
                if incoming.kind == LAP:
                    if incoming.lap == 0:
                        self._new_mb(incoming.micro_batch)
                    out = self._forward_lap(self.mbs[incoming.micro_batch], self._lap_from(incoming))
            ran_forward = out.kind in (LAP, DONE)
            if ran_forward:
                self.stats.forward_laps += 1
            if self.last and out.kind == DONE:
                done += 1
                if not self.training:
                    self.alive -= 1
                    del self.mbs[out.micro_batch]
                elif self.gpipe:
                    held.append(out.micro_batch)
                    if done == self.n:
                        ready.extend(held)
                else:
                    ready.append(out.micro_batch)
            t1 = time.perf_counter()
            # backward slot
            grad_out = self.link.backward_payload()
            t1b = time.perf_counter()
            grad_msg, ran_backward = GradMessage(), False
            if self.training and final_round is None:
                item = None
                if bwd_head[0] == GRAD and not (self.last and bwd_head[2] == 0):
                    m, k = bwd_head[1], bwd_head[2]
                    item = (m, k - 1) if self.last else (m, k)
                elif self.last and ready:
                    m = ready.popleft()
                    item = (m, len(self.mbs[m].laps) - 1)
                if item is not None:
                    grad_in = self._backward_lap(item[0], item[1], grad_out)
                    self.stats.backward_laps += 1
                    ran_backward = True
                    if not self.first or item[1] > 0:
                        grad_msg = GradMessage(GRAD, item[0], item[1], grad_in if grad_in is not None
                                               else torch.zeros(self.link.spec.batch, self.link.spec.seq,
                                                                self.link.spec.hidden, device=self.device))
            t2 = time.perf_counter()
            self.stats.slots.append((int(ran_forward), int(ran_backward)))
            self.stats.forward_s += t1 - t0
            self.stats.backward_s += t2 - t1b
            # stage 0 decides the end
            if self.first and final_round is None and injected == self.n and self.alive == 0:
                final_round = r + self.P - 1
                out = LapMessage(STOP, aux=final_round)
            if final_round is not None and r == final_round:    # no exchange after the last round
                self.link.wait_sends()
                break
            self.link.post_round(out, grad_msg)
            r += 1
        self.stats.rounds = r + 1
        self.stats.busy_s = self.stats.forward_s + self.stats.backward_s
        self.stats.total_s = time.perf_counter() - start

    def results(self) -> List:
        return [self.infos[m] for m in range(self.n)] if self.last else []


def forward_backward_pipelining_with_laps(*, forward_step_func: Optional[Callable] = None,
                                          data_iterator: Optional[Iterator], model: torch.nn.Module,
                                          num_microbatches: int, forward_only: bool = False,
                                          scale_loss: Optional[Callable] = None, halting="learned",
                                          autocast_dtype: Optional[torch.dtype] = None,
                                          compact: bool = True, order: str = "1f1b",
                                          max_in_flight: Optional[int] = None,
                                          lap_trace: Optional[list] = None,
                                          stats: Optional[ScheduleStats] = None,
                                          no_sync: Callable[[], ContextManager] = contextlib.nullcontext
                                          ) -> List:
    """Run the forward (and unless ``forward_only`` the backward) of ``num_microbatches`` on this
    stage (``model``: the stage itself, a data-parallel wrapper's ``module``). Gradients accumulate
    into the parameters' ``.grad`` (each loss divided by ``num_microbatches``, then
    ``scale_loss``); the whole call runs under ``no_sync()`` (the data-parallel wrapper's,
    ``optim.grad_sync``) and the caller's ``finish_grad_sync`` reduces. ``halting``: one mode or callable for
    all micro-batches, or a list with one per micro-batch. ``order``: ``"1f1b"`` (backward as soon
    as a micro-batch finished, at most ``max_in_flight`` (default 2·P) alive) or ``"gpipe"`` (every
    backward after every forward). ``lap_trace``: a list that receives ``(micro_batch, k)`` for
    every forward lap this stage runs; ``stats``: a :class:`ScheduleStats` to fill.

    Returns the last stage's infos in micro-batch order; ``[]`` on the other stages.
    """
    if parallel_state.get_pipeline_model_parallel_world_size() < 2:
        raise ValueError("the lap pipeline schedule needs --pipeline-model-parallel-size >= 2; "
                         "use training.schedules.forward_backward_no_pipelining")
    if order not in PIPELINE_ORDERS:
        raise ValueError(f"--pipeline-schedule {order!r}: use one of {', '.join(PIPELINE_ORDERS)}")
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"--pipeline-max-in-flight {max_in_flight}: give at least 1")
    if isinstance(halting, (list, tuple)) and len(halting) != num_microbatches:
        raise ValueError(f"halting has {len(halting)} entries for {num_microbatches} micro-batches")
    sync_ctx = no_sync() if not forward_only else contextlib.nullcontext()
    grad_ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
    run = _LapPipeline(model, forward_step_func, data_iterator, num_microbatches, forward_only, scale_loss,
                       halting, autocast_dtype, compact, lap_trace, order, max_in_flight, stats)
    with sync_ctx, grad_ctx, weight_cast_region(run.device, autocast_dtype):
        run.run()
    return run.results()


def infos_from_last_stage(infos: List[torch.Tensor], numel: int, device=None) -> List[torch.Tensor]:
    """The sum of the last stage's per-micro-batch info vectors (float64, length ``numel``), on
    every stage of the pipeline, as a one-element list (one broadcast over the PP group)."""
    device = device or torch.device("cpu")
    total = torch.zeros(numel, dtype=torch.float64, device=device)
    if infos:
        total += torch.stack([i.to(device, torch.float64) for i in infos]).sum(0)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(total, parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return [total]
