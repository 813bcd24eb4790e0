"""Parameter and optimizer memory per rank during forward/backward: DeepSpeed ZeRO-1/2/3 vs ours.

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_zero_deepspeed.py [--preset small] [--dp 2]

One gloo world of DP spawned CPU processes (one thread each) trains the same model five ways one
after the other: DeepSpeed ZeRO-1, -2, -3 (``optim/deepspeed_glue.py``, client AdamW, fp32) and the
native distributed optimizer ZeRO-1, -2 (``--use-distributed-optimizer --zero-stage 1/2``).

Parameter bytes are counted by tensor accounting, sampled at every module's forward pre-hook and
forward hook and at every module's backward (a gradient hook on its output): the distinct storages
of the parameters' ``.data`` that are materialised (a ZeRO-3 parameter released by DeepSpeed has an
empty ``.data``), plus parameter storages the autograd graph still holds for backward (recorded with
``saved_tensors_hooks``: a weight a layer saved and DeepSpeed has since released still occupies
memory), plus DeepSpeed's ZeRO-3 partitions (``ds_tensor``). Optimizer bytes are the client Adam
state plus DeepSpeed's fp32 master partitions (the native optimizer's ``state_bytes``) after the
last step. Gradients are not compared here (``bench/bench_zero_memory.py`` measures ours).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import weakref

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from dist_utils import run_distributed_hard_exit  # noqa: E402

from megatron_alcot import hardware  # noqa: E402
from megatron_alcot.config import OptimizerConfig  # noqa: E402
from megatron_alcot.model import build_model  # noqa: E402
from megatron_alcot.model.presets import preset  # noqa: E402
from megatron_alcot.optim.deepspeed_glue import initialize_deepspeed  # noqa: E402
from megatron_alcot.optim.distributed_optimizer import build_distributed_optimizer  # noqa: E402
from megatron_alcot.parallel import parallel_state  # noqa: E402
from megatron_alcot.utils.atomic import atomic_output  # noqa: E402

OPTIM = OptimizerConfig(lr=1e-3, weight_decay=0.1, clip_grad=1.0)
MICRO, SEQ = 2, 64
SETUPS = ("ds-zero1", "ds-zero2", "ds-zero3", "ds-zero3-release", "native-zero1", "native-zero2")
# DeepSpeed keeps a parameter gathered when it is used again within stage3_max_reuse_distance
# elements (default 1e9) and prefetches stage3_prefetch_bucket_size (5e7) ahead: for a model this
# small that is every parameter. "ds-zero3-release" sets both to 0 (and partitions small ones too).
RELEASE = {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0,
           "stage3_param_persistence_threshold": 0}


class ParamMeter:
    """Peak bytes of parameter storage alive while forward and backward run (see module doc)."""

    def __init__(self, model: torch.nn.Module):
        self.params = list(model.parameters())
        self.saved = []               # weak references to saved tensors that were parameter storage
        self.peak = 0
        self.armed = False
        for module in model.modules():
            module.register_forward_pre_hook(lambda m, a: self.sample())
            module.register_forward_hook(self._after_forward)

    def _after_forward(self, module, args, out):
        self.sample()
        outs = out if isinstance(out, (tuple, list)) else \
            list(out.values()) if isinstance(out, dict) else [out]
        for t in outs:
            if torch.is_tensor(t) and t.requires_grad:
                t.register_hook(lambda g: self.sample())

    def _pack(self, t):
        if self.armed and t.untyped_storage().data_ptr() in {p.data.untyped_storage().data_ptr()
                                                             for p in self.params if p.data.numel()}:
            self.saved.append(weakref.ref(t))
        return t

    def graph_hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def bytes_now(self) -> int:
        storages = {}
        for p in self.params:
            if p.data.numel():
                s = p.data.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
            part = getattr(p, "ds_tensor", None)
            if part is not None:
                storages[part.untyped_storage().data_ptr()] = part.untyped_storage().nbytes()
        for ref in self.saved:
            t = ref()
            if t is not None:
                s = t.untyped_storage()
                storages.setdefault(s.data_ptr(), s.nbytes())
        return sum(storages.values())

    def sample(self) -> None:
        if self.armed:
            self.peak = max(self.peak, self.bytes_now())


def _ds_optimizer_bytes(opt) -> int:
    inner = getattr(opt, "optimizer", opt)
    total = sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
                if torch.is_tensor(t))
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        total += sum(t.numel() * t.element_size() for t in getattr(opt, name, None) or [])
    return total


def _body(rank, world, preset_name, steps):
    torch.set_num_threads(1)
    parallel_state.initialize_model_parallel(1, 1)
    cfg = preset(preset_name, seq_length=SEQ)
    g = torch.Generator().manual_seed(rank)
    data = [(torch.randint(0, cfg.vocab_size, (MICRO, SEQ), generator=g),
             torch.randint(0, cfg.vocab_size, (MICRO, SEQ), generator=g)) for _ in range(steps)]
    rows = {}
    for setup in SETUPS:
        torch.manual_seed(0)
        model = build_model(cfg)
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        stage = int(setup.split("-")[1][-1])
        if setup.startswith("ds"):
            engine, opt = initialize_deepspeed(
                model, None, {"steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
                              "zero_optimization": RELEASE if setup.endswith("release") else {}},
                lr=OPTIM.lr, weight_decay=OPTIM.weight_decay, clip_grad=OPTIM.clip_grad,
                micro_batch_size=MICRO, global_batch_size=MICRO * world, zero_stage=stage)
        else:
            opt = build_distributed_optimizer(model, OPTIM, zero_stage=stage, bucket_size_mb=1.0)
            engine = opt.wrap_model(model)
        meter = ParamMeter(model)
        losses = []
        for step, (tokens, labels) in enumerate(data):
            meter.armed = step > 0                 # the first step allocates; measure the steady state
            meter.saved.clear()
            with meter.graph_hooks():
                if setup.startswith("ds"):
                    loss = engine(tokens, labels=labels).loss
                    engine.backward(loss)
                    meter.armed = False
                    engine.step()
                else:
                    engine.zero_grad_buffer()
                    loss = engine(tokens, labels=labels).loss
                    loss.backward()
                    meter.armed = False
                    engine.finish_grad_sync()
                    opt.step()
            losses.append(float(loss.detach()))
        opt_bytes = _ds_optimizer_bytes(opt) if setup.startswith("ds") else opt.state_bytes()
        rows[setup] = {"peak": meter.peak, "between": meter.bytes_now(), "full": full,
                       "optim": opt_bytes, "losses": losses}
        del engine, opt, model, meter
    buf = io.BytesIO()
    torch.save(rows, buf)
    return buf.getvalue()


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.2f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                  "docs", "bench_zero_deepspeed.md"))
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    payloads = run_distributed_hard_exit(_body, args.dp, args.preset, args.steps,
                                         env={"DS_ACCELERATOR": "cpu"}, timeout=1200)
    rank0 = torch.load(io.BytesIO(payloads[0]), weights_only=True)
    full = rank0["native-zero1"]["full"]
    lines = ["| set-up | peak parameter storage in forward/backward (MiB) | vs full parameters | "
             "parameters between steps (MiB) | optimizer state + master (MiB) | loss at last step |",
             "|---|---|---|---|---|---|"]
    for setup, row in rank0.items():
        lines.append(f"| {setup} | {_mib(row['peak'])} | {row['peak'] / full:.2f} | {_mib(row['between'])} | "
                     f"{_mib(row['optim'])} | {row['losses'][-1]:.4f} |")
    print("\n".join(lines), flush=True)
    text = "\n".join([
        "# Parameter memory per rank: DeepSpeed ZeRO-1/2/3 vs native ZeRO-1/2",
        "",
        f"Measured by `DS_ACCELERATOR=cpu bench/bench_zero_deepspeed.py --preset {args.preset} --dp "
        f"{args.dp} --steps {args.steps}` on {hardware.describe_cpu()}, torch {torch.__version__}, gloo, one thread "
        f"per rank, rank 0 shown; fp32, micro batch {MICRO} x seq {SEQ}, one micro-batch per step, "
        f"model preset `{args.preset}` ({_mib(full)} MiB of fp32 parameters). Peaks are taken over the "
        "steps after the first.",
        "",
        "Parameter storage is counted by tensor accounting at every module's forward pre-hook, forward "
        "hook and backward (a gradient hook on the module's output), not from RSS: the distinct "
        "storages behind the parameters' `.data` that are materialised, the parameter storages the "
        "autograd graph holds for backward (`saved_tensors_hooks`), and DeepSpeed ZeRO-3's 1/DP "
        "partitions (`ds_tensor`). Optimizer state is the Adam moments plus fp32 master partitions, "
        "after the last step. Gradient buffers are not counted here (see "
        "[bench_zero_memory.md](bench_zero_memory.md) for ours).",
        "",
        *lines,
        "",
        "DeepSpeed ZeRO-3 goes through `Zero3Root` (`optim/deepspeed_glue.py`): only the parameters "
        "read outside their own module's forward (LM head / embedding, routers) are external to the "
        "root and stay gathered through forward and backward; every other module's parameters are "
        "gathered for its forward and for the backward of each of its calls (each lap) and released "
        "after. *ds-zero3* runs DeepSpeed's defaults: a parameter reused within "
        "`stage3_max_reuse_distance` (1e9 elements) is not released and `stage3_prefetch_bucket_size` "
        "(5e7) is prefetched, which at this model size is all of them, so its peak is the full "
        "parameters plus the 1/DP partitions (`ds_tensor`). *ds-zero3-release* sets "
        f"{', '.join(f'`{k}` = {v}' for k, v in RELEASE.items())}: the peak is the partitions plus "
        "the external parameters plus one module's weights. At real sizes the defaults release too "
        "(a layer is next used one lap later, about the decoder's size away: above 1e9 elements for the 1.4B model).",
        "",
        f"Load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after the run (a shared "
        "machine; the byte counts do not depend on it).",
        "",
    ])
    with atomic_output(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
