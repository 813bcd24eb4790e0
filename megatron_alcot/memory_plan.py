"""Per-rank memory plan of a training run, before any compute.

    args = parse_args(pretrain_flags)
    plan = plan_memory(args, world_size=32, budget_gib=80.0)
    print(format_plan(plan)); plan.fits, plan.peak_bytes, plan.to_json()

What it counts, per pipeline stage (every tensor-parallel rank of a stage holds the same shapes):

* **parameters**: the stage is built on the ``meta`` device with this rank's tensor-parallel shard
  (``build_pipeline_stage``), so the counts are the model's own, not a formula;
* **gradients** and **optimizer state** by ZeRO stage: plain DDP (0), ``--use-distributed-optimizer``
  with ``--zero-stage`` 1 or 2, or the stage of ``--deepspeed-config`` (1, 2, 3);
* **activations** of one micro-batch, lap by lap, by a per-layer formula under the chosen
  ``--recompute-granularity`` (every token assumed to take every lap: the upper bound), the keys and
  values of earlier laps that later laps attend to, and the fused LM-head/loss buffers;
* **micro-batches in flight** on the stage under the pipeline schedule
  (``training.pipeline_schedule.max_in_flight_microbatches``);
* **communication buffers**: gradient buckets, pipeline send/receive payloads;
* a fixed **runtime reserve** for the CUDA context, library workspaces and NCCL buffers.

Fragmentation of the caching allocator is not modelled: it is what the headroom is for.
The per-layer activation formula is checked against measured peaks of small CPU runs by
``bench/bench_memory_plan.py`` (docs/bench_memory_plan.md).
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from megatron_alcot.config import ConfigError, DataConfig
from megatron_alcot.model.pipeline_split import build_pipeline_stage, layer_ranges
from megatron_alcot.training.pipeline_schedule import max_in_flight_microbatches

GIB = float(2 ** 30)
LLAMA2_VOCAB = 32000
ZERO2_BUCKET_MB = 25.0      # gradient bucket of the bucketed ZeRO-2 reduce-scatter (--ddp-bucket-size-mb)


# --- parameter counts from the model itself -----------------------------------------------------
@dataclass(frozen=True)
class StageParams:
    """Parameter elements of one pipeline stage on one tensor-parallel rank."""

    pp_rank: int
    layer_range: Tuple[int, int]
    numel: int                  # every parameter of the stage
    matmul_numel: int           # 2-D weights (cast to bf16/fp16 under autocast)
    largest_layer_numel: int    # one transformer layer (DeepSpeed ZeRO-3 gathers one at a time)
    vocab_numel: int            # embedding + LM head weights on this stage
    param_bytes: int            # bytes per parameter element


@contextlib.contextmanager
def _tensor_parallel_rank(tp: int, tp_rank: int) -> Iterator[None]:
    """The process-group registry as a TP rank would see it, with no communicator (meta builds)."""
    from megatron_alcot.parallel import parallel_state
    reg = parallel_state._REGISTRY
    if reg.initialized:
        raise RuntimeError("plan the memory outside a training process (model-parallel groups exist)")
    saved = replace(reg)
    reg.initialized, reg.tp_size = True, tp
    reg.tp_ranks = [0 if i == tp_rank else -1 - i for i in range(tp)]
    try:
        yield
    finally:
        for name in ("initialized", "tp_size", "tp_ranks"):
            setattr(reg, name, getattr(saved, name))


def stage_parameters(model_cfg, parallel_cfg) -> List[StageParams]:
    """Build every pipeline stage on the ``meta`` device (TP rank 0; the other TP ranks are checked
    to hold the same shapes) and count its parameters.

        >>> [s.numel for s in stage_parameters(cfg, ParallelConfig(pipeline_model_parallel_size=2))]
    """
    tp, pp = parallel_cfg.tensor_model_parallel_size, parallel_cfg.pipeline_model_parallel_size
    ranges = layer_ranges(model_cfg.num_layers, pp, parallel_cfg.pipeline_layer_split)
    out = []
    for rank in range(pp):
        shapes = None
        for tp_rank in range(tp):
            with _tensor_parallel_rank(tp, tp_rank), torch.device("meta"):
                stage = build_pipeline_stage(model_cfg, parallel_cfg, pipeline_rank=rank, pipeline_size=pp)
            these = [(n, tuple(p.shape), p.dtype) for n, p in stage.named_parameters()]
            if shapes is not None and these != shapes:
                raise RuntimeError(f"TP rank {tp_rank} of stage {rank} holds other shapes than TP rank 0")
            shapes = these
        layers = list(stage.decoder.layers.values())
        numel = sum(p.numel() for p in stage.parameters())
        matmul = sum(p.numel() for p in stage.parameters() if p.dim() == 2)
        vocab = sum(p.numel() for n, p in stage.named_parameters()
                    if n in ("embedding.word_embeddings.weight", "output_layer.weight"))
        largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
        dtype_bytes = {p.element_size() for p in stage.parameters()}
        out.append(StageParams(rank, ranges[rank], numel, matmul, largest, vocab, max(dtype_bytes)))
    return out


# --- activations ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationBytes:
    """One micro-batch on one stage (bytes)."""

    layers: int                 # saved for backward inside the transformer layers, every lap
    kv_earlier_laps: int        # keys/values of earlier laps that later laps attend to
    lap_boundaries: int         # lap inputs/outputs, final norm, readout, router (outside layers)
    lm_head: int                # fused LM-head + loss buffers (last stage)
    recompute_working: int      # one layer recomputed during backward (recompute only)
    kv_grads: int = 0           # gradients of earlier laps' keys/values, waiting during the backward
    per_lap_layers: Tuple[int, ...] = ()
    first_layer_lap0: int = 0   # what the stage's first layer keeps in lap 0 (the backward's last)

    @property
    def held(self) -> int:
        """What one in-flight micro-batch keeps until its backward."""
        return self.layers + self.kv_earlier_laps + self.lap_boundaries + self.lm_head


def _layer_row_elems(h: int, q: int, kv: int, f: int, granularity: Optional[str]):
    """(residual-dtype elements, compute-dtype elements) one layer keeps per token row in one lap.

    q = heads·d/tp, kv = groups·d/tp, f = ffn/tp. Without recompute: the layer input and the
    mid-layer residual with each RMSNorm's normalised input, both norm outputs (matmul inputs),
    the fused QKV output (its V slice is the lap's value block, which later laps read), rotated Q
    and K, the attention output (projection input), the MLP's fused gate/up output, SiLU output
    and product. Full recompute keeps the layer input and this lap's K and QKV block (later laps
    attend to them; the last lap's are kept only under the lap pipeline, see activation_bytes);
    selective recompute drops what the attention core keeps."""
    if granularity == "full":
        return h, q + 3 * kv
    if granularity == "selective":
        return 4 * h, 2 * h + q + 3 * kv + 4 * f
    return 4 * h, 2 * h + (q + 2 * kv) + 2 * q + kv + 4 * f


def _attention_extra_row_elems(kv: int, seq: int, lap: int, dense_mask: bool) -> int:
    """Compute-dtype elements per row the attention core keeps in lap ``lap`` >= 1 beyond its
    own lap: the concatenated keys and values of laps 0..lap and, with a dense-mask core (sdpa),
    the additive mask ``[b, 1, s, (lap+1)·s]`` the boolean 2-D lap mask becomes (FlexAttention
    keeps only its block mask)."""
    if lap < 1:
        return 0
    return 2 * (lap + 1) * kv + ((lap + 1) * seq if dense_mask else 0)


def activation_bytes(model_cfg, stage: StageParams, *, tp: int, micro_batch: int, recompute: Optional[str],
                     compute_bytes: int, residual_bytes: int = 4, post_process: bool = False,
                     pre_process: bool = False, laps: Optional[int] = None,
                     dense_mask: bool = True, recomputed_layers: Optional[int] = None,
                     pipelined: bool = False) -> ActivationBytes:
    """Activation bytes of one micro-batch on ``stage``, every token taking every lap.
    ``recomputed_layers``: how many of the stage's layers ``recompute`` applies to (``--recompute-method
    block --recompute-num-layers N``: the first N); None: all of them. ``pipelined``: the stage runs
    under the lap pipeline (PP > 1), where each lap is its own graph.

        >>> activation_bytes(cfg, stage, tp=2, micro_batch=1, recompute="full", compute_bytes=2).held
    """
    cfg = model_cfg
    laps = cfg.max_latent_steps + 1 if laps is None else laps
    s = cfg.seq_length
    n = micro_batch * s
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv, f = cfg.num_attention_heads * d // tp, cfg.query_groups * d // tp, cfg.ffn_size // tp
    layers = stage.layer_range[1] - stage.layer_range[0]
    wrapped = 0 if recompute is None else min(layers, layers if recomputed_layers is None else recomputed_layers)
    plain = layers - wrapped
    scalars = n * (2 * 4 + 4 * q // d)                          # RMSNorm rstd, attention log-sum-exp

    def layer_bytes(granularity):
        r_el, c_el = _layer_row_elems(h, q, kv, f, granularity)
        return n * (r_el * residual_bytes + c_el * compute_bytes) + (0 if granularity else scalars)

    per_lap = [wrapped * layer_bytes(recompute) + plain * layer_bytes(None) for _ in range(laps)]
    if recompute == "full" and wrapped and not pipelined:
        # No later lap reads the last lap's keys/values, so a checkpointed layer's outputs beyond
        # its hidden state are dropped as soon as they are made. The lap pipeline keeps every lap's
        # keys/values (graph outputs of its lap-cut graph, tied to the detached leaves).
        per_lap[-1] -= wrapped * n * (q + 3 * kv) * compute_bytes
    first = layer_bytes(recompute) if wrapped else layer_bytes(None)     # block recompute: the first N
    if wrapped and recompute == "full" and laps == 1 and not pipelined:
        first -= n * (q + 3 * kv) * compute_bytes
    # Lap k >= 1 attends to the keys/values of laps 0..k (saved by the attention core); in a
    # recomputed layer the attention is rebuilt in the backward, so only the working set holds them.
    kv_cat = plain * sum(n * _attention_extra_row_elems(kv, s, k, dense_mask) * compute_bytes
                         for k in range(1, laps))
    boundary = laps * 3 * n * h * residual_bytes               # lap input, final norm, readout term
    boundary += (int(pre_process) + int(post_process)) * n * h * residual_bytes   # embedding; readout sum
    lm_head = 0
    if post_process:
        vocab_local = cfg.padded_vocab_size(tp) // tp
        chunk = min(n, max(32, (1 << 20) // vocab_local))
        # Gradients of hidden and of the LM-head weight are formed in the forward (fp32), plus
        # a chunk of logits and of probabilities.
        lm_head = 4 * (n * h + vocab_local * h + 2 * chunk * vocab_local)
    working = 0
    if wrapped:      # the widest (last) lap of one layer (full) or its attention (selective)
        r_full, c_full = _layer_row_elems(h, q, kv, f, None)
        if recompute == "selective":
            r_full, c_full = 0, 3 * q + 3 * kv
        working = n * (r_full * residual_bytes + c_full * compute_bytes) + scalars + \
            n * _attention_extra_row_elems(kv, s, laps - 1, dense_mask) * compute_bytes
    # The backward of lap k hands every earlier lap the gradient of its keys/values, which waits
    # until that lap's own backward (under PP: the K/V leaves of the lap-cut graphs).
    kv_grads = layers * (laps - 1) * 2 * n * kv * compute_bytes
    return ActivationBytes(sum(per_lap), kv_cat, boundary, lm_head, working, kv_grads, tuple(per_lap), first)


def _peak_activations(act: ActivationBytes, in_flight: int, laps: int, late_grads: Optional[int],
                      late_before_first_layer: Optional[int] = None) -> int:
    """The largest activation (plus late-allocated gradient) bytes over a step's timeline.

    At the end of a forward every in-flight micro-batch holds ``act.held``. The backward starts with
    the LM head, whose forward-made gradients are then released, before the first layer is
    recomputed (``act.recompute_working``). ``late_grads``: gradient bytes allocated only during the
    backward (autograd's own with one plain replica and one micro-batch, ZeRO-2's staging buckets);
    they all exist once the last lap's backward is done, while the earlier laps' activations wait.
    With one lap the backward's last point of interest is the stage's first layer, recomputed
    while lap 0's boundary tensors wait and ``late_before_first_layer`` of the late gradients (all
    but the first layer's and the embedding's) exist.
    """
    ended = act.held * in_flight
    recomputing = ended - act.lm_head + act.recompute_working
    if laps > 1:
        # Once the last lap's backward is done: the earlier laps' activations, the gradients of
        # their keys/values, the next recomputed layer, and the late gradients.
        later = (act.held - act.lm_head) * (laps - 1) // laps + act.kv_grads + \
            act.held * (in_flight - 1) + act.recompute_working + (late_grads or 0)
    else:
        late = late_grads if late_before_first_layer is None else late_before_first_layer
        later = act.lap_boundaries + act.first_layer_lap0 + act.held * (in_flight - 1) + \
            act.recompute_working + (late or 0)
    return max(ended, recomputing, later)


# --- the plan ------------------------------------------------------------------------------------
@dataclass
class PlanRow:
    name: str
    bytes: List[int]            # one value per pipeline stage
    note: str = ""


@dataclass
class MemoryPlan:
    """Per-rank bytes of each pipeline stage; ``peak_bytes`` is the largest stage's total."""

    world_size: int
    tp: int
    pp: int
    dp: int
    zero_stage: int             # 0 plain DDP, 1/2 distributed optimizer, 1/2/3 DeepSpeed
    zero_engine: str            # "ddp" | "distributed-optimizer" | "deepspeed"
    recompute: str
    num_microbatches: int
    in_flight: List[int]
    rows: List[PlanRow]
    totals: List[int]
    budget_bytes: Optional[int]
    stage_params: List[StageParams] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(self.totals)

    @property
    def headroom(self) -> Optional[float]:
        """Fraction of the budget left at the peak (negative: does not fit)."""
        if not self.budget_bytes:
            return None
        return 1.0 - self.peak_bytes / self.budget_bytes

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.peak_bytes <= self.budget_bytes

    def row(self, name: str) -> PlanRow:
        return next(r for r in self.rows if r.name == name)

    def to_json(self) -> str:
        return json.dumps({
            "world_size": self.world_size, "tp": self.tp, "pp": self.pp, "dp": self.dp,
            "zero_stage": self.zero_stage, "zero_engine": self.zero_engine, "recompute": self.recompute,
            "num_microbatches": self.num_microbatches, "in_flight": self.in_flight,
            "stage_params": [s.numel for s in self.stage_params],
            "rows": {r.name: r.bytes for r in self.rows}, "totals": self.totals,
            "peak_bytes": self.peak_bytes, "peak_gib": round(self.peak_bytes / GIB, 3),
            "budget_gib": None if self.budget_bytes is None else round(self.budget_bytes / GIB, 3),
            "headroom_pct": None if self.headroom is None else round(100 * self.headroom, 2),
            "fits": self.fits}, sort_keys=False)


def _deepspeed_zero(path: str) -> Tuple[int, float]:
    """(ZeRO stage, reduce bucket elements) of a DeepSpeed JSON config."""
    try:
        with open(path) as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--deepspeed-config {path}: cannot read it as JSON ({exc})") from exc
    zero = config.get("zero_optimization") or {}
    return int(zero.get("stage", 0)), float(zero.get("reduce_bucket_size", 5e8))


def _plan_vocab(args, vocab_size: Optional[int]) -> int:
    d = args.data
    if d.tokenizer_type == "NullTokenizer":
        if not d.vocab_size:
            raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size N")
        return int(d.vocab_size)
    if vocab_size:
        return int(vocab_size)
    if d.tokenizer_model and os.path.exists(d.tokenizer_model):
        from megatron_alcot.data.tokenizers import build_tokenizer
        return build_tokenizer(d.tokenizer_type, tokenizer_model=d.tokenizer_model).vocab_size
    if d.tokenizer_type == "Llama2Tokenizer":
        return LLAMA2_VOCAB        # every LLaMA-2 SentencePiece model has this vocabulary
    raise ConfigError(f"--tokenizer-model {d.tokenizer_model}: not readable here, so the vocabulary size is "
                      "unknown; give the plan --plan-vocab-size N (e.g. 32000 for the LLaMA-2 tokenizer)")


def validate_for_plan(args, world_size: int, vocab_size: Optional[int] = None) -> None:
    """``validate_args`` on every part of the run except the data files and the tokenizer file, which
    a plan made on a login node may not see. Sets ``args.model.vocab_size``: ``vocab_size``, else the
    readable tokenizer's, else 32000 for ``Llama2Tokenizer``. Raises ConfigError."""
    from megatron_alcot.arguments import validate_args
    if world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world_size}")
    args.model.vocab_size = _plan_vocab(args, vocab_size)
    data = args.data
    args.data = DataConfig(mock_data=True, tokenizer_type="NullTokenizer", vocab_size=args.model.vocab_size)
    try:
        validate_args(args, world_size)
    finally:
        args.data = data


def plan_memory(args, world_size: int, budget_gib: Optional[float] = None, *, reserve_gib: float = 0.0,
                device: str = "cuda") -> MemoryPlan:
    """The per-rank plan of a validated configuration (see :func:`validate_for_plan`).

    ``reserve_gib``: fixed runtime reserve (CUDA context, workspaces, NCCL). ``device``: where the
    run trains ("cuda" or "cpu"); it decides the attention core ``--attention-backend auto`` picks
    for lap masks. The pipeline order and bound are the run's ``--pipeline-schedule`` and
    ``--pipeline-max-in-flight``.
    """
    m, par, t = args.model, args.parallel, args.train
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    dp = par.data_parallel_size(world_size)
    num_micro = t.num_micro_batches(dp)
    stages = stage_parameters(m, par)
    low_precision = bool(t.bf16 or t.fp16)
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    # CUDA's auto core for lap masks is FlexAttention (model/attention_backends.py); sdpa and the
    # unfused core expand the mask densely.
    dense_mask = not (device == "cuda" and m.attention_backend in ("auto", "flex"))
    compute_bytes = 2 if low_precision else 4
    recompute = t.recompute_granularity
    if recompute == "full" and t.recompute_method == "block" and t.recompute_num_layers:
        recompute_note = f"full, first {t.recompute_num_layers} layers of each stage"
        recomputed_layers = t.recompute_num_layers
    else:
        recomputed_layers = None
        recompute_note = recompute or "none"

    if par.deepspeed_config:
        engine = "deepspeed"
        zero, ds_bucket = _deepspeed_zero(par.deepspeed_config)
    elif par.use_distributed_optimizer:
        engine, zero, ds_bucket = "distributed-optimizer", par.zero_stage, 0.0
    else:
        engine, zero, ds_bucket = "ddp", 0, 0.0

    names = ["parameters", "autocast weight copies", "gradients", "optimizer state",
             "activations: layers (all laps)", "activations: KV of earlier laps",
             "activations: lap boundaries", "activations: LM head + loss",
             "micro-batches in flight", "activations held (× in flight)", "recompute working set",
             "communication buffers", "runtime reserve"]
    values: Dict[str, List[int]] = {n: [] for n in names}
    in_flight_all, totals, notes = [], [], []
    # One plain replica keeps autograd's own gradients, freed between steps (training/ddp.py).
    lazy_grads = engine == "ddp" and dp == 1 and not par.sequence_parallel
    bucket_bytes = int(t.ddp_bucket_size_mb * 2 ** 20)
    for s in stages:
        pre, post = s.pp_rank == 0, s.pp_rank == pp - 1
        numel, pb = s.numel, s.param_bytes
        shard = -(-numel // dp)
        params = numel * pb
        if engine == "deepspeed" and zero == 3:
            params = shard * pb + s.largest_layer_numel * (2 if low_precision else pb)
        if zero >= 1 and engine == "distributed-optimizer":
            params = shard * dp * pb                     # the flat buffer, padded to a multiple of DP
        # fp32 master weights are the parameters themselves (fp32 storage); Adam keeps two moments.
        # ``late``: the part of ``grads`` allocated only during the backward.
        late = numel * 4 if lazy_grads and num_micro == 1 else 0
        if zero == 0:
            grads, opt = numel * 4, numel * 8
        elif zero == 1:
            grads, opt = shard * dp * 4, shard * 8
        else:
            if engine == "deepspeed":
                grads = min(shard * dp * 4, shard * 4 + int(ds_bucket) * 4)
            elif pp > 1:
                # The lap-cut backward accumulates every staging bucket until finish_grad_sync.
                grads = shard * dp * 4 + shard * 4
            else:
                # Buckets reduce-scatter into the 1/DP shard as the backward fills them: one filling,
                # one in flight; the staging buckets exist only during the backward.
                late = min(shard * dp * 4, 2 * bucket_bytes)
                grads = shard * 4 + late
            opt = shard * 8
        in_flight = 1 if pp == 1 else max_in_flight_microbatches(
            pp, s.pp_rank, num_micro, par.pipeline_max_in_flight, par.pipeline_schedule)
        act = activation_bytes(m, s, tp=tp, micro_batch=t.micro_batch_size, recompute=recompute,
                               compute_bytes=compute_bytes, pre_process=pre, post_process=post,
                               dense_mask=dense_mask, recomputed_layers=recomputed_layers, pipelined=pp > 1)
        # One low-precision copy of each matmul weight for the whole step (the step's weight-cast region).
        copies = s.matmul_numel * 2 if low_precision else 0
        staging = 0
        if device == "cpu" and engine == "distributed-optimizer" and dp > 1:
            # gloo's reduce-scatter and all-gather go through a staging copy of the whole bucket
            staging = min(bucket_bytes, shard * dp * 4)
        p2p = 0
        if pp > 1:       # a lap's hidden state received and one sent, in the activation dtype
            p2p = 2 * t.micro_batch_size * m.seq_length * m.hidden_size * compute_bytes
        comm = staging + p2p
        vals = {
            "parameters": params, "autocast weight copies": copies, "gradients": grads,
            "optimizer state": opt, "activations: layers (all laps)": act.layers,
            "activations: KV of earlier laps": act.kv_earlier_laps,
            "activations: lap boundaries": act.lap_boundaries, "activations: LM head + loss": act.lm_head,
            "micro-batches in flight": in_flight, "activations held (× in flight)": act.held * in_flight,
            "recompute working set": act.recompute_working, "communication buffers": comm,
            "runtime reserve": int(reserve_gib * GIB)}
        for n in names:
            values[n].append(int(vals[n]))
        in_flight_all.append(in_flight)
        late_before_first = late
        if lazy_grads:   # autograd's gradients of the first layer and the embedding come last
            embedding = (m.padded_vocab_size(tp) // tp) * m.hidden_size \
                if pre and (m.untie_embeddings_and_output_weights or pp > 1) else 0
            late_before_first = max(0, late - 4 * (s.largest_layer_numel + embedding))
        base = params + copies + opt + vals["runtime reserve"]
        # With every gradient in one bucket the reduce-scatter starts once the backward is done, so
        # its staging copy meets only the gradients and lap 0's boundary tensors; with several
        # buckets one may be in flight at the backward's peak (counted there: an upper bound).
        one_bucket = numel * 4 <= bucket_bytes
        during = base + grads - late + p2p + (0 if one_bucket else staging) + _peak_activations(
            act, in_flight, m.max_latent_steps + 1, late or None, late_before_first if late else None)
        after = base + grads + staging + p2p + act.lap_boundaries if staging and one_bucket else 0
        totals.append(max(during, after))
    if zero == 2 and engine == "distributed-optimizer":
        notes.append("gradients under ZeRO-2: " + ("staging buckets held until the end of the lap-cut "
                     "backward (PP > 1), plus the 1/DP shard" if pp > 1 else
                     "1/DP shard + two buckets (reduce-scatter as the backward fills them)"))
    if lazy_grads and num_micro == 1:
        notes.append("one plain replica, one micro-batch: autograd allocates the gradients during the "
                     "backward, as the activations are released")
    notes.append("activations assume every token takes every lap (the most the run can hold)")
    rows = [PlanRow(n, values[n]) for n in names]
    return MemoryPlan(world_size, tp, pp, dp, zero, engine, recompute_note, num_micro, in_flight_all,
                      rows, totals, None if budget_gib is None else int(budget_gib * GIB), stages, notes)


# --- printing ------------------------------------------------------------------------------------
_COUNT_ROWS = ("micro-batches in flight",)
_DETAIL_ROWS = ("activations: layers (all laps)", "activations: KV of earlier laps",
                "activations: lap boundaries", "activations: LM head + loss")


def _gib(n: int) -> str:
    return f"{n / GIB:.3f}"


def format_plan(plan: MemoryPlan) -> str:
    """The per-rank table (GiB, or MiB below 1 GiB), one column per pipeline stage, then the verdict."""
    unit, scale = ("GiB", GIB) if plan.peak_bytes >= GIB else ("MiB", float(2 ** 20))
    heads = [f"stage {s.pp_rank} (layers {s.layer_range[0]}-{s.layer_range[1] - 1})"
             for s in plan.stage_params]
    width = max(len(r.name) for r in plan.rows) + 4
    lines = [f"memory plan per rank: world {plan.world_size} = TP {plan.tp} × PP {plan.pp} × DP {plan.dp}; "
             f"{plan.zero_engine} ZeRO-{plan.zero_stage}; recompute {plan.recompute}; "
             f"{plan.num_microbatches} micro-batches per step",
             "parameters per rank: " + ", ".join(f"stage {s.pp_rank}: {s.numel:,}" for s in plan.stage_params),
             "",
             "| " + f"component ({unit})".ljust(width) + " | " + " | ".join(heads) + " |",
             "|" + "-" * (width + 2) + "|" + "|".join("-" * (len(h) + 2) for h in heads) + "|"]
    for r in plan.rows:
        name = ("  " + r.name) if r.name in _DETAIL_ROWS else r.name
        cells = [str(v) if r.name in _COUNT_ROWS else f"{v / scale:.3f}" for v in r.bytes]
        lines.append("| " + name.ljust(width) + " | " +
                     " | ".join(c.rjust(len(h)) for c, h in zip(cells, heads)) + " |")
    lines.append("| " + "total".ljust(width) + " | " +
                 " | ".join(f"{v / scale:.3f}".rjust(len(h)) for v, h in zip(plan.totals, heads)) + " |")
    lines.append("")
    if plan.budget_bytes is not None:
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        lines.append(f"peak {_gib(plan.peak_bytes)} GiB of {_gib(plan.budget_bytes)} GiB: {verdict}, "
                     f"headroom {100 * plan.headroom:.1f} %")
    else:
        lines.append(f"peak {_gib(plan.peak_bytes)} GiB (no --gpu-memory-gb budget given)")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def world_size_from_slurm(env=None) -> Optional[int]:
    """``SLURM_NTASKS``, else ``SLURM_NNODES × SLURM_NTASKS_PER_NODE`` (as sbatch sets them); None if unset."""
    env = os.environ if env is None else env
    if env.get("SLURM_NTASKS"):
        return int(env["SLURM_NTASKS"])
    nodes, per_node = env.get("SLURM_NNODES"), env.get("SLURM_NTASKS_PER_NODE")
    if nodes and per_node:
        return int(nodes) * int(per_node.split("(")[0])
    return None


__all__ = ["ActivationBytes", "MemoryPlan", "PlanRow", "StageParams", "activation_bytes", "format_plan",
           "plan_memory", "stage_parameters", "validate_for_plan",
           "world_size_from_slurm", "GIB"]
