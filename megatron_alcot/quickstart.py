"""The README's main job, on CPU: corpus -> tokenizer -> .bin/.idx -> ALCoT and vanilla models ->
held-out evaluation -> Hugging Face export -> generation -> report.

    python -m megatron_alcot.quickstart --output-dir quickstart_out     # ~700 CPU-s: ~6 min on 2 idle cores
    python -m megatron_alcot.quickstart --output-dir out --precision fp32   # default auto: bf16 where measured fast
    python -m megatron_alcot.quickstart --output-dir out --quick        # a few iterations per model (tests)
    python -m megatron_alcot.quickstart --output-dir out --stages evaluate export generate report

Stages (each prints a header with the elapsed wall and CPU time, and its own cost when done):

1. ``corpus``      the embedded English corpus (``data.corpus.write_corpus``) -> corpus.jsonl
2. ``tokenizer``   SentencePiece BPE, ``--vocab-size`` (4096) -> tokenizer.model
3. ``preprocess``  ``data.preprocess_data`` -> data/corpus_text_document.{bin,idx}
4. ``train_alcot`` / ``train_vanilla``  the same tiny LLaMA (4 layers, hidden 128, seq 128) with and
   without adaptive latent steps, on the same tokens in the same order, through the code path of
   ``pretrain_alcot.py`` (``training.train.train`` with a Megatron-style argument list), saved to
   checkpoints/{alcot,vanilla}
5. ``evaluate``    both checkpoints through ``evaluation.evaluate.evaluate()`` on the held-out
   documents (the ``valid`` part of ``--split 95,5,0``): perplexity, ALCoT's mean latent steps and
   depth histogram, as measured
6. ``export``      ``hf.convert_to_hf.convert_to_hf()`` -> hf/alcot; loaded by
   ``transformers`` (``trust_remote_code``) and compared with the native model on a held-out batch
   (max abs logit difference, per-token latent steps)
7. ``generate``    greedy continuation of a held-out prompt by the native ALCoT checkpoint on the KV
   cache (``model.generation.generate``), each token printed with its latent steps
8. ``report``      results.json (measured numbers only), summary.md, loss_curves.png

Each stage records its wall and CPU time (user + sys of this process and its finished children);
``idle_estimate_s`` = CPU time / cores is what the stage would take on an idle machine, which is the
number the default iteration count is chosen by (wall times on a shared machine are longer).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List

from megatron_alcot.data import preprocess_data, tokenizer_training
from megatron_alcot.evaluation.evaluate import evaluate, split_documents
from megatron_alcot.hf.convert_to_hf import convert_to_hf

SPLIT = "95,5,0"
PRECISIONS = ("auto", "bf16", "fp32")
# Defaults of the full run and of --quick; a flag given explicitly wins over both.
FULL = dict(train_iters=300, global_batch_size=16, micro_batch_size=8, eval_iters=8, eval_documents=None,
            generate_tokens=32)
QUICK = dict(train_iters=2, global_batch_size=4, micro_batch_size=4, eval_iters=1, eval_documents=4,
             generate_tokens=6)


def cpu_seconds() -> float:
    """User + sys CPU seconds of this process (all threads) and its waited-for children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Context:
    out: str
    opts: argparse.Namespace
    results: dict = field(default_factory=dict)

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    @property
    def data_prefix(self) -> str:
        return self.path("data", "corpus_text_document")

    def checkpoint(self, method: str) -> str:
        return self.path("checkpoints", method)


# ----------------------------------------------------------------------------- data
def stage_corpus(ctx: Context) -> None:
    from megatron_alcot.data.corpus import write_corpus
    target = ctx.path("corpus.jsonl")
    if not os.path.exists(target):
        stats = write_corpus(target)
        print(f"  {stats.documents} documents, {stats.bytes / 1e6:.2f} MB -> {target}")
    else:
        print(f"  reusing {target}")


def stage_tokenizer(ctx: Context) -> None:
    model = ctx.path("tokenizer.model")
    if not os.path.exists(model):
        tokenizer_training.train([ctx.path("corpus.jsonl")], ctx.path("tokenizer"), ctx.opts.vocab_size,
                                 num_threads=2)
    print(f"  vocabulary {ctx.opts.vocab_size} -> {model}")


def stage_preprocess(ctx: Context) -> None:
    prefix = ctx.path("data", "corpus")
    if not os.path.exists(prefix + "_text_document.idx"):
        os.makedirs(ctx.path("data"), exist_ok=True)
        code = preprocess_data.main([
            "--input", ctx.path("corpus.jsonl"), "--output-prefix", prefix,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            ctx.path("tokenizer.model"), "--append-eod", "--workers", "2"])
        if code:
            raise SystemExit(f"preprocessing failed with exit code {code}")
    print(f"  -> {prefix}_text_document.bin/.idx")


# ----------------------------------------------------------------------------- training
def training_argv(ctx: Context, method: str) -> List[str]:
    o = ctx.opts
    argv = [
        "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
        "--seq-length", str(o.seq_length), "--max-position-embeddings", str(o.seq_length),
        "--untie-embeddings-and-output-weights",
        "--micro-batch-size", str(o.micro_batch_size), "--global-batch-size", str(o.global_batch_size),
        "--train-iters", str(o.train_iters), "--lr", "2e-3", "--min-lr", "2e-4",
        "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.05", "--weight-decay", "0.1",
        "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--clip-grad", "1.0", "--seed", "1234",
        "--data-path", ctx.data_prefix, "--split", SPLIT,
        "--data-cache-path", ctx.path("data", "cache"),
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", ctx.path("tokenizer.model"),
        "--log-interval", str(max(1, o.train_iters // 10)), "--eval-interval", str(o.train_iters),
        "--eval-iters", str(o.eval_iters), "--num-workers", "0",
        "--save", ctx.checkpoint(method), "--save-interval", str(o.train_iters),
        "--tensorboard-dir", ctx.path("tensorboard", method),
        "--latent-method", method, "--latent-max-steps", str(o.latent_max_steps),
    ]
    if o.bf16:
        argv.append("--bf16")
    return argv


def _train(ctx: Context, method: str) -> None:
    from megatron_alcot.arguments import parse_args
    from megatron_alcot.training.train import train
    shutil.rmtree(ctx.checkpoint(method), ignore_errors=True)   # a fresh run, not a resume
    argv = training_argv(ctx, method)
    print("  pretrain_alcot.py " + " ".join(argv), flush=True)
    history = train(parse_args(argv))
    final = history.evals[-1] if history.evals else {}
    ctx.results[method] = {
        "train_loss": [s["loss"] for s in history.iterations],
        "train_lm_loss": [s["lm_loss"] for s in history.iterations],
        "valid_lm_loss": final.get("lm_loss"), "valid_ppl": final.get("ppl"),
        "valid_mean_latent_steps": final.get("mean_latent_steps"),
        "valid_depth_share": final.get("depth_share"),
        "train_mean_latent_steps_last": (history.iterations[-1]["mean_latent_steps"]
                                         if history.iterations else None),
        "iterations": history.iteration, "consumed_samples": history.consumed_samples,
        "checkpoint": ctx.checkpoint(method), "argv": argv,
    }


def stage_train_alcot(ctx: Context) -> None:
    _train(ctx, "alcot")


def stage_train_vanilla(ctx: Context) -> None:
    _train(ctx, "vanilla")


# ----------------------------------------------------------------------------- after training
def heldout_documents(ctx: Context):
    """The held-out documents (valid part of ``SPLIT``) as id lists, capped by --eval-documents."""
    docs, _ = split_documents(ctx.data_prefix, SPLIT, "valid", ctx.opts.eval_documents)
    return docs


def evaluate_checkpoint(ctx: Context, method: str) -> dict:
    """``tools/evaluate.py`` on a saved checkpoint and the held-out split (what the report shows)."""
    return evaluate(load=ctx.checkpoint(method), data_path=ctx.data_prefix, split=SPLIT,
                                      split_name="valid", seq_length=ctx.opts.seq_length,
                                      max_documents=ctx.opts.eval_documents)


def stage_evaluate(ctx: Context) -> None:
    ctx.results["heldout"] = {}
    for method in ("alcot", "vanilla"):
        r = evaluate_checkpoint(ctx, method)
        ctx.results["heldout"][method] = r
        hist = " ".join(f"{k}:{c}" for k, c in r["latent_steps_histogram"].items())
        print(f"  {method:8s} held-out documents {r['document_range']}: {r['tokens']} tokens, perplexity "
              f"{r['token_perplexity']:.2f}, mean latent steps {r['mean_latent_steps']:.3f} (tokens at depth "
              f"{hist})", flush=True)


def export_sample(ctx: Context):
    """``[2, seq]`` ids cut from the concatenated held-out documents."""
    import torch
    docs, _ = split_documents(ctx.data_prefix, SPLIT, "valid")
    flat = [t for d in docs for t in d]
    need = 2 * ctx.opts.seq_length
    if len(flat) < need:
        raise RuntimeError(f"the held-out split has {len(flat)} tokens, fewer than the {need} of the sample")
    return torch.tensor(flat[:need]).view(2, -1)


def compare_export(ctx: Context, hf_dir: str) -> dict:
    """Load the export with transformers and compare it with the native checkpoint on a sample."""
    import torch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from megatron_alcot.evaluation.perplexity import load_native_model
    native, cfg, _ = load_native_model(ctx.checkpoint("alcot"))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    x = export_sample(ctx)
    with torch.no_grad():
        a, b = native(x), hf(x)
    diff = float((a.logits[..., :cfg.vocab_size].float() - b.logits.float()).abs().max())
    return {"dir": hf_dir, "class": type(hf).__name__, "sample_shape": list(x.shape),
            "max_abs_logit_diff": diff, "latent_steps_equal": bool(torch.equal(a.num_steps, b.num_steps)),
            "mean_latent_steps": float(a.num_steps.float().mean())}


def stage_export(ctx: Context) -> None:
    hf_dir = convert_to_hf(ctx.checkpoint("alcot"), ctx.path("hf", "alcot"), overwrite=True,
                           log=lambda m: print("  " + m))
    r = compare_export(ctx, hf_dir)
    ctx.results["export"] = r
    print(f"  transformers loaded {r['class']} (trust_remote_code); sample {r['sample_shape']}: max abs logit "
          f"difference {r['max_abs_logit_diff']:.2e}, latent steps equal: {r['latent_steps_equal']}", flush=True)
    if not (r["max_abs_logit_diff"] <= ctx.opts.export_tolerance and r["latent_steps_equal"]):
        raise RuntimeError(f"the export in {hf_dir} does not match the native checkpoint (max abs logit "
                           f"difference {r['max_abs_logit_diff']:.2e}, tolerance {ctx.opts.export_tolerance}, "
                           f"latent steps equal: {r['latent_steps_equal']})")


def generation_prompt(ctx: Context) -> List[int]:
    return heldout_documents(ctx)[0][:ctx.opts.prompt_tokens]


def run_generation(ctx: Context, use_cache: bool = True) -> dict:
    """Greedy decoding by the native ALCoT checkpoint; ids, pieces and per-token latent steps."""
    from megatron_alcot.evaluation import generate_tokens
    from megatron_alcot.evaluation.perplexity import load_native_model, native_tokenizer
    model, _, meta = load_native_model(ctx.checkpoint("alcot"))
    tok = native_tokenizer(meta)
    prompt = generation_prompt(ctx)
    ids, steps = generate_tokens(model, prompt, ctx.opts.generate_tokens, eos=tok.eod, use_cache=use_cache)
    return {"prompt": tok.detokenize(prompt), "prompt_ids": prompt, "ids": ids, "latent_steps": steps,
            "pieces": [tok.detokenize([i]) for i in ids], "text": tok.detokenize(ids),
            "mean_latent_steps": sum(steps) / len(steps) if steps else 0.0}


def marked_text(gen: dict) -> str:
    """``prompt || piece[ℓ]piece[ℓ]...`` on one line (newlines shown as \\n)."""
    text = gen["prompt"] + " || " + "".join(f"{p}[{s}]" for p, s in zip(gen["pieces"], gen["latent_steps"]))
    return text.replace("\n", "\\n")


def stage_generate(ctx: Context) -> None:
    gen = run_generation(ctx)
    ctx.results["generation"] = gen
    print(f"  piece[ℓ] = the token was emitted after ℓ latent steps; prompt || continuation:\n  {marked_text(gen)}")
    print(f"  mean latent steps of the {len(gen['ids'])} generated tokens: {gen['mean_latent_steps']:.2f}")


# ----------------------------------------------------------------------------- report
def plot_losses(ctx: Context, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in ("alcot", "vanilla"):
        r = ctx.results.get(method) or {}
        if r.get("train_lm_loss"):
            ax.plot(range(1, len(r["train_lm_loss"]) + 1), r["train_lm_loss"], label=f"{method} (lm loss)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training LM loss")
    ax.set_title("quickstart: ALCoT vs vanilla, same tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png + ".tmp.png", dpi=120)
    os.replace(png + ".tmp.png", png)
    plt.close(fig)


def summary_markdown(results: dict) -> str:
    lines = ["# Quickstart results", "", "Measured by `python -m megatron_alcot.quickstart`; "
             "every number is in results.json.", "", "## Held-out perplexity (tools/evaluate.py, valid split)", "",
             "| model | documents | tokens | perplexity | mean latent steps | tokens at depth 0/1/2/... |",
             "|---|---|---|---|---|---|"]
    for method, r in (results.get("heldout") or {}).items():
        hist = " / ".join(str(c) for c in r["latent_steps_histogram"].values())
        lines.append(f"| {method} | {r['documents']} | {r['tokens']} | {r['token_perplexity']:.2f} | "
                     f"{r['mean_latent_steps']:.3f} | {hist} |")
    precision = "bf16 autocast" if (results.get("options") or {}).get("bf16", True) else "fp32"
    lines += ["", f"## Training (validation at the last iteration, packed sequences, {precision})", "",
              "| model | iterations | final train LM loss | valid perplexity | valid mean latent steps |",
              "|---|---|---|---|---|"]
    for method in ("alcot", "vanilla"):
        r = results.get(method)
        if r:
            last = r["train_lm_loss"][-1] if r["train_lm_loss"] else float("nan")
            lines.append(f"| {method} | {r['iterations']} | {last:.3f} | {r['valid_ppl']:.2f} | "
                         f"{r['valid_mean_latent_steps']:.3f} |")
    e = results.get("export")
    if e:
        lines += ["", "## Hugging Face export", "", f"`{e['class']}` loaded with `trust_remote_code=True`; on a "
                  f"held-out batch {e['sample_shape']}: max abs logit difference {e['max_abs_logit_diff']:.2e}, "
                  f"per-token latent steps equal: {e['latent_steps_equal']}."]
    g = results.get("generation")
    if g:
        lines += ["", "## Greedy generation (native checkpoint, KV cache)", "",
                  "`piece[ℓ]`: the token was emitted after ℓ latent steps; `||` separates prompt and continuation.",
                  "", "```", marked_text(g), "```", f"Mean latent steps: {g['mean_latent_steps']:.2f}."]
    stages = results.get("stages") or {}
    if stages:
        lines += ["", "## Cost per stage", "", "| stage | wall s | CPU s | idle estimate s (CPU / cores) |",
                  "|---|---|---|---|"]
        for name, t in stages.items():
            lines.append(f"| {name} | {t['wall_s']:.1f} | {t['cpu_s']:.1f} | {t['idle_estimate_s']:.1f} |")
        lines.append(f"| total | {sum(t['wall_s'] for t in stages.values()):.1f} | "
                     f"{sum(t['cpu_s'] for t in stages.values()):.1f} | "
                     f"{sum(t['idle_estimate_s'] for t in stages.values()):.1f} |")
    return "\n".join(lines) + "\n"


def stage_report(ctx: Context) -> None:
    png = ctx.path("loss_curves.png")
    plot_losses(ctx, png)
    a, v = ctx.results.get("heldout", {}).get("alcot"), ctx.results.get("heldout", {}).get("vanilla")
    if a and v:
        print(f"  held-out perplexity: ALCoT {a['token_perplexity']:.2f}, vanilla {v['token_perplexity']:.2f}; "
              f"ALCoT mean latent steps {a['mean_latent_steps']:.3f}")
    print(f"  -> {png}, {ctx.path('summary.md')}, {ctx.path('results.json')}")


@dataclass
class Stage:
    name: str
    title: str
    run: Callable[[Context], None]


STAGES: List[Stage] = [
    Stage("corpus", "Build the embedded corpus", stage_corpus),
    Stage("tokenizer", "Train a SentencePiece tokenizer", stage_tokenizer),
    Stage("preprocess", "Preprocess into Megatron .bin/.idx", stage_preprocess),
    Stage("train_alcot", "Train the tiny ALCoT model", stage_train_alcot),
    Stage("train_vanilla", "Train the vanilla model of the same size on the same tokens", stage_train_vanilla),
    Stage("evaluate", "Evaluate both checkpoints on the held-out split (tools/evaluate.py)", stage_evaluate),
    Stage("export", "Export ALCoT to Hugging Face and compare logits", stage_export),
    Stage("generate", "Generate from the native ALCoT checkpoint (KV cache)", stage_generate),
    Stage("report", "Report", stage_report),
]


def write_results(ctx: Context) -> str:
    path = ctx.path("results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(ctx.results, f, indent=1)
    os.replace(path + ".tmp", path)
    with open(ctx.path("summary.md"), "w") as f:
        f.write(summary_markdown(ctx.results))
    return path


def resolve_precision(precision: str) -> str:
    """``bf16`` or ``fp32``; ``auto`` asks the hardware probe and logs its answer on one line."""
    if precision != "auto":
        return precision
    from megatron_alcot import hardware
    decision = hardware.precision_choice("cpu")
    hardware.log_choice("--precision", decision, print)
    return decision.choice


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_alcot.quickstart", description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default="quickstart_out")
    p.add_argument("--quick", action="store_true",
                   help=f"a few iterations per model and a small evaluation (defaults {QUICK})")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=None, help=f"default {FULL['micro_batch_size']}")
    p.add_argument("--global-batch-size", type=int, default=None, help=f"default {FULL['global_batch_size']}")
    p.add_argument("--train-iters", type=int, default=None, help=f"per model; default {FULL['train_iters']}")
    p.add_argument("--eval-iters", type=int, default=None, help="validation iterations at the end of training")
    p.add_argument("--eval-documents", type=int, default=None,
                   help="held-out documents to evaluate (default: all of the valid split)")
    p.add_argument("--generate-tokens", type=int, default=None, help=f"default {FULL['generate_tokens']}")
    p.add_argument("--prompt-tokens", type=int, default=12, help="prompt = first N tokens of a held-out document")
    p.add_argument("--export-tolerance", type=float, default=1e-3, help="max abs logit difference allowed")
    p.add_argument("--latent-max-steps", type=int, default=3)
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="bf16 autocast or fp32 training; auto: bf16 where a bf16 matmul measured faster than "
                        "fp32 on this CPU (megatron_alcot.hardware), fp32 elsewhere")
    p.add_argument("--no-bf16", dest="precision", action="store_const", const="fp32", help="same as --precision fp32")
    p.add_argument("--stages", nargs="*", default=None,
                   help=f"run only these stages (of {', '.join(s.name for s in STAGES)})")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    opts = build_parser().parse_args(argv)
    for key, value in (QUICK if opts.quick else FULL).items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    opts.bf16 = resolve_precision(opts.precision) == "bf16"
    unknown = set(opts.stages or ()) - {s.name for s in STAGES}
    if unknown:
        raise SystemExit(f"--stages: unknown {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(s.name for s in STAGES)}")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    os.makedirs(opts.output_dir, exist_ok=True)
    ctx = Context(out=opts.output_dir, opts=opts)
    if os.path.exists(ctx.path("results.json")):
        with open(ctx.path("results.json")) as f:
            ctx.results = json.load(f)
    ctx.results["options"] = vars(opts)
    stages = ctx.results.setdefault("stages", {})
    cores = os.cpu_count() or 1
    wall0, cpu0 = time.time(), cpu_seconds()
    selected = [s for s in STAGES if opts.stages is None or s.name in opts.stages]
    for i, stage in enumerate(selected, 1):
        print(f"\n== [{i}/{len(selected)}] {stage.title} ({time.time() - wall0:.0f} s elapsed, "
              f"{cpu_seconds() - cpu0:.0f} s CPU)", flush=True)
        w, c = time.time(), cpu_seconds()
        stage.run(ctx)
        w, c = time.time() - w, cpu_seconds() - c
        stages[stage.name] = {"wall_s": round(w, 2), "cpu_s": round(c, 2), "idle_estimate_s": round(c / cores, 2)}
        print(f"  [{stage.name}: {w:.1f} s wall, {c:.1f} s CPU, ~{c / cores:.1f} s on {cores} idle cores]",
              flush=True)
        write_results(ctx)
    total_cpu = sum(t["cpu_s"] for t in stages.values())
    ctx.results.update(total_seconds=round(time.time() - wall0, 1), total_cpu_seconds=round(total_cpu, 1),
                       idle_estimate_seconds=round(total_cpu / cores, 1))
    print(f"\nresults -> {write_results(ctx)} ({time.time() - wall0:.0f} s wall, {cpu_seconds() - cpu0:.0f} s CPU, "
          f"~{total_cpu / cores:.0f} s on {cores} idle cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
