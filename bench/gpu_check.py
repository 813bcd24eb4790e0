"""One-GPU check: model equivalence on CUDA, training MFU, ALCoT step time against the FLOPs ideal,
peak memory. Writes docs/bench_gpu.md.

    python bench/gpu_check.py                      # on a CUDA machine, ~5-7 minutes
    python bench/gpu_check.py --smoke --output /tmp/bench_gpu.md   # tiny CPU run of every stage

Stages (each records its result or its error on the page; one failing stage does not stop the rest):

1. ``equivalence`` (fp32, TF32 off): ALCoT's parallel forward against token-by-token decoding with
   the (layer, lap) KV cache (logits, halting); the lap-mask attention core (FlexAttention) against
   SDPA with the dense mask, outputs and gradients; routers under bf16 autocast against the fp32
   router (bit-equal g, same halting) and g at initialisation = 0.9.
2. ``mfu``: a 1.4B-shaped vanilla LLaMA (``--layers`` of its 24; fp32 parameters, bf16 autocast,
   AdamW, seq 2048), step time, model FLOPs (``model/flops.py``) / time / the device's bf16 dense
   peak (``PEAK_BF16_TFLOPS`` by device name).
3. ``alcot``: the same shape with ℓmax 3 under learned halting (routers that halt tokens at
   different steps) and fixed halting (every token runs 3 steps); time per model FLOP against the
   vanilla run's, i.e. step time against the FLOPs ideal.
4. ``memory``: peak allocated memory of stages 2 and 3 against the memory planner's prediction
   (``megatron_alcot/memory_plan.py``) for the same shape.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_alcot.model import build_model  # noqa: E402
from megatron_alcot.model import flops as model_flops  # noqa: E402
from megatron_alcot.model.attention_backends import core_attention  # noqa: E402
from megatron_alcot.model.compaction import Compaction  # noqa: E402
from megatron_alcot.model.kv_cache import LatentKVCache, decode  # noqa: E402
from megatron_alcot.model.lap_attention import LapMask  # noqa: E402
from megatron_alcot.model.presets import preset  # noqa: E402
from megatron_alcot.model.latent.router import halting_update  # noqa: E402
from megatron_alcot.utils.atomic import atomic_output  # noqa: E402

# Dense bf16 tensor-core peak (no sparsity), TFLOP/s, matched against torch.cuda.get_device_name.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
                    ("V100", 125.0), ("B200", 2250.0)]
FULL_LAYERS = 24


def peak_tflops(name: str):
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_routers(model, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in model.latent.routers:
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * std)


# --- 1. equivalence ---------------------------------------------------------------------------
def check_alcot_vs_decoder(device, smoke):
    s = 16 if smoke else 64
    cfg = preset("tiny" if smoke else "small", latent_method="alcot", latent_max_steps=3,
                 seq_length=s, latent_threshold=0.3, untie_embeddings_and_output_weights=True)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    _random_routers(model, 0.15 if smoke else 0.05)
    tokens = torch.randint(0, cfg.vocab_size, (2, s), device=device)
    with torch.no_grad():
        full = model(tokens)
        cache = LatentKVCache()
        outs = [decode(model, cache, tokens[:, t:t + 1]) for t in range(s)]
    logits = torch.cat([o.logits for o in outs], 1)
    steps = torch.cat([o.num_steps for o in outs], 1)
    diff = (logits - full.logits).abs().max().item()
    same = bool(torch.equal(steps, full.num_steps))
    depths = sorted(set(full.num_steps.reshape(-1).tolist()))
    return dict(ok=same and diff < 1e-4, detail=f"max |logit diff| {diff:.2e}, halting equal {same}, "
                                               f"depths seen {depths}")


def check_lap_attention(device, smoke):
    b, s, steps = 2, (48 if smoke else 1024), 3
    g = torch.Generator().manual_seed(0)
    active = torch.ones(b, s, dtype=torch.bool)
    comps = []
    for _ in range(steps):
        comps.append(Compaction.build(active.to(device)))
        active = active & (torch.rand(b, s, generator=g) < 0.7)
    q_comp = comps[-1]
    lm = LapMask.from_blocks(q_comp.order, q_comp.valid, [c.order for c in comps], [c.valid for c in comps])
    _, _, m, keys = lm.shape
    base = [torch.randn(b, 8, m, 64, generator=g), torch.randn(b, 2, keys, 64, generator=g),
            torch.randn(b, 2, keys, 64, generator=g)]
    grad = device.type != "cpu"       # CPU FlexAttention has no backward in this torch
    results = []
    for backend, mask in (("flex", lm), ("sdpa", lm.dense())):
        q, k, v = (t.to(device).requires_grad_(grad) for t in base)
        with torch.set_grad_enabled(grad):
            out = core_attention(q, k, v, mask=mask, backend=backend)
            if grad:
                out.square().sum().backward()
        results.append([out.detach()] + ([q.grad, k.grad, v.grad] if grad else []))
    diffs = [(a - e).abs().max().item() / max(e.abs().max().item(), 1e-6) for a, e in zip(*results)]
    names = ["out", "dq", "dk", "dv"][:len(diffs)]
    return dict(ok=max(diffs) < 1e-4, detail=", ".join(f"{n} rel {d:.1e}" for n, d in zip(names, diffs))
                + ("" if grad else " (forward only: no CPU flex backward)") + f", layout {list(lm.shape)}")


def check_bf16_routers(device, smoke):
    s = 16 if smoke else 256
    cfg = preset("tiny" if smoke else "small", latent_method="alcot", latent_max_steps=3,
                 seq_length=s, latent_threshold=0.3, latent_loss_weight=0.1,
                 untie_embeddings_and_output_weights=True)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    tokens = torch.randint(0, cfg.vocab_size, (2, s), device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        g0 = model(tokens).continue_prob[..., 0]
    init_err = (g0.double() - 0.9).abs().max().item()
    _random_routers(model, 0.15)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(tokens, labels=tokens, return_lap_hidden=True)
    out.loss.backward()
    reach = torch.ones_like(out.exit_mass[..., 0])
    active = torch.ones_like(reach, dtype=torch.bool)
    equal = True
    for k, h in enumerate(out.lap_hidden[:3]):
        lin = model.latent.routers[k]
        ref = torch.sigmoid(torch.nn.functional.linear(h.float(), lin.weight, lin.bias).squeeze(-1))
        equal &= bool(torch.equal(out.continue_prob[..., k], torch.where(active, ref, 0.0)))
        reach, cont, _ = halting_update(reach, ref, active, cfg.latent_threshold, k)
        equal &= bool(torch.equal(out.lap_executed[k + 1], cont))
        active = cont
    return dict(ok=equal and init_err <= torch.finfo(torch.float32).eps,
                detail=f"g at init |g - 0.9| {init_err:.1e}; g bit-equal to fp32 router and same "
                       f"halting: {equal}")


# --- 2./3. training step time ------------------------------------------------------------------
def train_shape(smoke, layers, method, micro_batch):
    if smoke:
        return preset("tiny", latent_method=method, latent_max_steps=3 if method == "alcot" else 0,
                      seq_length=32, untie_embeddings_and_output_weights=True), 2
    return preset("1.4b", latent_method=method, latent_max_steps=3 if method == "alcot" else 0,
                  num_layers=layers, seq_length=2048), micro_batch


def time_training(cfg, micro_batch, device, steps, warmup, halting="learned", router_std=None,
                  compile_layers=False):
    """(seconds per step, model FLOPs per step, peak bytes or None, mean latent steps)."""
    from megatron_alcot.training.compile import apply_torch_compile
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if router_std is not None:
        _random_routers(model, router_std)
    if compile_layers:
        apply_torch_compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_length), device=device)
    labels = torch.roll(tokens, -1, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    flops, depth = 0.0, 0.0
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(tokens, labels=labels, halting=halting)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            num_steps = out.num_steps.cpu()
            flops += model_flops.training_flops(cfg, num_steps)
            depth += float(num_steps.float().mean())
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del model, opt, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    times.sort()
    return times[len(times) // 2], flops / steps, peak, depth / steps


def stage_mfu(device, args, results):
    cfg, mb = train_shape(args.smoke, args.layers, "vanilla", args.micro_batch)
    rows = []
    for compiled in ([False, True] if args.compile else [False]):
        sec, fl, peak, _ = time_training(cfg, mb, device, args.steps, args.warmup, compile_layers=compiled)
        tflops = fl / sec / 1e12
        peak_t = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        rows.append(dict(compiled=compiled, sec=sec, tflops=tflops,
                         mfu=tflops / peak_t if peak_t else None, peak_bytes=peak))
    results["mfu"] = dict(layers=cfg.num_layers, micro_batch=mb, seq=cfg.seq_length, rows=rows,
                          peak_tflops=peak_tflops(torch.cuda.get_device_name(device))
                          if device.type == "cuda" else None)


def stage_alcot(device, args, results):
    van_cfg, mb = train_shape(args.smoke, args.alcot_layers, "vanilla", args.alcot_micro_batch)
    cfg, _ = train_shape(args.smoke, args.alcot_layers, "alcot", args.alcot_micro_batch)
    base_sec, base_fl, base_peak, _ = time_training(van_cfg, mb, device, args.steps, args.warmup)
    base_rate = base_sec / base_fl
    rows = [dict(name="vanilla (reference)", sec=base_sec, flops=base_fl, ratio=1.0, depth=0.0,
                 peak_bytes=base_peak)]
    for name, halting, std in (("learned halting", "learned", 0.05 if not args.smoke else 0.3),
                               ("fixed halting (3 steps)", "never", None)):
        sec, fl, peak, depth = time_training(cfg, mb, device, args.steps, args.warmup, halting, std)
        rows.append(dict(name=name, sec=sec, flops=fl, ratio=sec / (fl * base_rate), depth=depth,
                         peak_bytes=peak))
    results["alcot"] = dict(layers=cfg.num_layers, micro_batch=mb, seq=cfg.seq_length, rows=rows)


def _planned_peak(cfg, micro_batch, device):
    """The memory planner's per-rank peak for this single-process run (fp32 AdamW, bf16 autocast)."""
    from megatron_alcot.arguments import parse_args
    from megatron_alcot.memory_plan import plan_memory

    flags = ["--num-layers", cfg.num_layers, "--hidden-size", cfg.hidden_size,
             "--num-attention-heads", cfg.num_attention_heads, "--ffn-hidden-size", cfg.ffn_hidden_size,
             "--seq-length", cfg.seq_length, "--micro-batch-size", micro_batch,
             "--global-batch-size", micro_batch, "--vocab-size", cfg.vocab_size,
             "--tokenizer-type", "NullTokenizer", "--mock-data", "--train-iters", 1, "--bf16",
             "--latent-method", cfg.latent_method, "--latent-max-steps", cfg.latent_max_steps]
    if cfg.untie_embeddings_and_output_weights:
        flags.append("--untie-embeddings-and-output-weights")
    args = parse_args([str(f) for f in flags])
    return plan_memory(args, world_size=1, device=device.type).peak_bytes


def stage_memory(device, args, results):
    measured = []
    for row in results.get("mfu", {}).get("rows", []):
        shape = train_shape(args.smoke, args.layers, "vanilla", args.micro_batch)
        measured.append(("vanilla" + (" compiled" if row["compiled"] else ""), row["peak_bytes"],
                         _planned_peak(*shape, device)))
    methods = {"vanilla (reference)": "vanilla"}
    for row in results.get("alcot", {}).get("rows", []):
        shape = train_shape(args.smoke, args.alcot_layers, methods.get(row["name"], "alcot"),
                            args.alcot_micro_batch)
        measured.append((row["name"], row["peak_bytes"], _planned_peak(*shape, device)))
    results["memory"] = dict(measured=measured)


# --- page --------------------------------------------------------------------------------------
def _gib(x):
    return "n/a (CPU)" if x is None else f"{x / 2 ** 30:.1f} GiB"


def write_page(path, device, args, results, errors, started):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    lines = ["# One-GPU check", "",
             "Written by `bench/gpu_check.sh` (`bench/gpu_check.py`)"
             + (" in `--smoke` mode: a tiny CPU run of every stage, not a GPU measurement." if args.smoke
                else "."), "",
             f"Device: **{name}**; torch {torch.__version__}; "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"wall time {time.time() - started:.0f} s.", ""]
    eq = results.get("equivalence", {})
    if eq:
        lines += ["## 1. Equivalence (fp32, TF32 off)", "", "| check | result | detail |", "|---|---|---|"]
        lines += [f"| {k} | {'pass' if v['ok'] else 'FAIL'} | {v['detail']} |" for k, v in eq.items()]
        lines.append("")
    mfu = results.get("mfu")
    if mfu:
        lines += ["## 2. Training MFU, vanilla LLaMA 1.4B shape", "",
                  f"{mfu['layers']} of {FULL_LAYERS} layers, micro-batch {mfu['micro_batch']}, seq "
                  f"{mfu['seq']}, fp32 parameters + bf16 autocast, AdamW; device bf16 peak "
                  f"{mfu['peak_tflops'] or 'unknown'} TFLOP/s; median of {args.steps} steps.", "",
                  "| layers compiled | step s | model TFLOP/s | MFU | peak memory |", "|---|---|---|---|---|"]
        for r in mfu["rows"]:
            m = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
            lines.append(f"| {'yes' if r['compiled'] else 'no'} | {r['sec']:.3f} | {r['tflops']:.1f} | {m} | "
                         f"{_gib(r['peak_bytes'])} |")
        lines.append("")
    al = results.get("alcot")
    if al:
        lines += ["## 3. ALCoT ℓmax 3 against the FLOPs ideal", "",
                  f"{al['layers']} layers, micro-batch {al['micro_batch']}, seq {al['seq']}. "
                  "Ideal = the vanilla run's seconds per model FLOP times this run's FLOPs "
                  "(`model/flops.py`); ratio = step time / ideal.", "",
                  "| run | mean ℓ | step s | GFLOP/step | time / ideal | peak memory |", "|---|---|---|---|---|---|"]
        for r in al["rows"]:
            lines.append(f"| {r['name']} | {r['depth']:.2f} | {r['sec']:.3f} | {r['flops'] / 1e9:.1f} | "
                         f"{r['ratio']:.2f} | {_gib(r['peak_bytes'])} |")
        lines.append("")
    mem = results.get("memory")
    if mem:
        lines += ["## 4. Peak memory against the memory planner", "",
                  "The plan (`megatron_alcot/memory_plan.py`, `tools/plan_memory.py`) is for the same shape "
                  "trained by `pretrain_alcot.py` on one device: fp32 parameters and AdamW, bf16 autocast.", "",
                  "| run | peak allocated | planned | measured / planned |", "|---|---|---|---|"]
        for n, b, plan in mem["measured"]:
            ratio = "n/a" if b is None else f"{b / plan:.2f}"
            lines.append(f"| {n} | {_gib(b)} | {_gib(plan)} | {ratio} |")
        lines.append("")
    if errors:
        lines += ["## Errors", ""] + [f"- `{k}`: {v}" for k, v in errors.items()] + [""]
    with atomic_output(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of every stage")
    parser.add_argument("--output", default=None, help="page to write (default docs/bench_gpu.md; "
                        "--smoke needs an explicit path so the committed page is not overwritten)")
    parser.add_argument("--layers", type=int, default=FULL_LAYERS)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--alcot-layers", type=int, default=8)
    parser.add_argument("--alcot-micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also time the vanilla run with --torch-compile")
    parser.add_argument("--stages", default="equivalence,mfu,alcot,memory")
    args = parser.parse_args(argv)
    if args.smoke and args.output is None:
        parser.error("--smoke writes a CPU page: give --output PATH")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --smoke --output PATH for the CPU smoke")
    args.output = args.output or os.path.join(ROOT, "docs", "bench_gpu.md")
    args.steps = args.steps or (2 if args.smoke else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    device = torch.device("cpu" if args.smoke else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    started = time.time()
    results, errors = {}, {}
    stages = args.stages.split(",")

    def run(name, fn, *fargs):
        t0 = time.time()
        try:
            fn(*fargs)
        except Exception as exc:      # a bench page records a failing stage and goes on
            errors[name] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:400]
            traceback.print_exc()
        print(f"[{name}] {time.time() - t0:.1f} s", flush=True)
        # The page after every stage: a run stopped by its time limit still leaves what it measured.
        write_page(args.output, device, args, results, errors, started)

    if "equivalence" in stages:
        eq = results.setdefault("equivalence", {})
        for name, fn in (("ALCoT parallel forward vs token-by-token decoder", check_alcot_vs_decoder),
                         ("lap attention (flex) vs SDPA", check_lap_attention),
                         ("routers under bf16 autocast", check_bf16_routers)):
            run(name, lambda fn=fn, name=name: eq.__setitem__(name, fn(device, args.smoke)))
    if "mfu" in stages:
        run("mfu", stage_mfu, device, args, results)
    if "alcot" in stages:
        run("alcot", stage_alcot, device, args, results)
    if "memory" in stages:
        run("memory", stage_memory, device, args, results)
    write_page(args.output, device, args, results, errors, started)
    print(f"-> {args.output}")
    failed = [k for k, v in results.get("equivalence", {}).items() if not v["ok"]]
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
