"""The README's main job, on CPU: corpus -> tokenizer -> .bin/.idx -> ALCoT and vanilla models.

    python -m megatron_alcot.quickstart --output-dir quickstart_out          # ~6-10 min on 2 cores
    python -m megatron_alcot.quickstart --output-dir out --train-iters 20    # a quicker look

Stages (each prints a header; later parts of the project append stages to :data:`STAGES`):

1. ``corpus``     the embedded English corpus (``tools/build_corpus.py``'s function) -> corpus.jsonl
2. ``tokenizer``  SentencePiece BPE, ``--vocab-size`` (4096) -> tokenizer.model
3. ``preprocess`` ``tools/preprocess_data.py`` -> data/corpus_text_document.{bin,idx}
4. ``train_alcot`` / ``train_vanilla``  the same tiny LLaMA (4 layers, hidden 128, seq 128) with and
   without adaptive latent steps, on the same tokens in the same order, through the code path of
   ``pretrain_alcot.py`` (``training.train.train`` with a Megatron-style argument list)
5. ``report``     validation perplexity of both, the ALCoT model's mean executed latent steps and
   depth histogram as measured -> results.json and loss_curves.png

Every stage writes into ``--output-dir``; results.json holds the measured numbers only.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name: str):
    """Import ``tools/<name>.py`` (tools/ is a folder of scripts, not a package)."""
    path = os.path.join(REPO_ROOT, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_quickstart_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Context:
    out: str
    opts: argparse.Namespace
    results: dict = field(default_factory=dict)

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)


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
        _tool("train_tokenizer").train([ctx.path("corpus.jsonl")], ctx.path("tokenizer"),
                                       ctx.opts.vocab_size, num_threads=2)
    print(f"  vocabulary {ctx.opts.vocab_size} -> {model}")


def stage_preprocess(ctx: Context) -> None:
    prefix = ctx.path("data", "corpus")
    if not os.path.exists(prefix + "_text_document.idx"):
        os.makedirs(ctx.path("data"), exist_ok=True)
        code = _tool("preprocess_data").main([
            "--input", ctx.path("corpus.jsonl"), "--output-prefix", prefix,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            ctx.path("tokenizer.model"), "--append-eod", "--workers", "2"])
        if code:
            raise SystemExit(f"preprocessing failed with exit code {code}")
    print(f"  -> {prefix}_text_document.bin/.idx")


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
        "--data-path", ctx.path("data", "corpus_text_document"), "--split", "95,5,0",
        "--data-cache-path", ctx.path("data", "cache"),
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", ctx.path("tokenizer.model"),
        "--log-interval", str(max(1, o.train_iters // 10)), "--eval-interval", str(o.train_iters),
        "--eval-iters", str(o.eval_iters), "--num-workers", "0",
        "--tensorboard-dir", ctx.path("tensorboard", method),
        "--latent-method", method, "--latent-max-steps", str(o.latent_max_steps),
    ]
    if o.bf16:
        argv.append("--bf16")
    return argv


def _train(ctx: Context, method: str) -> None:
    from megatron_alcot.training.train import train
    argv = training_argv(ctx, method)
    print("  pretrain_alcot.py " + " ".join(argv))
    start = time.time()
    history = train(argv)
    final = history.evals[-1] if history.evals else {}
    ctx.results[method] = {
        "train_loss": [s["loss"] for s in history.steps],
        "train_lm_loss": [s["lm_loss"] for s in history.steps],
        "valid_lm_loss": final.get("lm_loss"), "valid_ppl": final.get("ppl"),
        "valid_mean_latent_steps": final.get("mean_latent_steps"),
        "valid_depth_share": final.get("depth_share"),
        "train_mean_latent_steps_last": history.steps[-1]["mean_latent_steps"] if history.steps else None,
        "iterations": history.iteration, "consumed_samples": history.consumed_samples,
        "seconds": round(time.time() - start, 1), "argv": argv,
    }


def stage_train_alcot(ctx: Context) -> None:
    _train(ctx, "alcot")


def stage_train_vanilla(ctx: Context) -> None:
    _train(ctx, "vanilla")


def stage_report(ctx: Context) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, r in ctx.results.items():
        if isinstance(r, dict) and "train_lm_loss" in r:
            ax.plot(range(1, len(r["train_lm_loss"]) + 1), r["train_lm_loss"], label=f"{method} (lm loss)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training LM loss")
    ax.set_title("quickstart: ALCoT vs vanilla, same tokens")
    ax.legend()
    fig.tight_layout()
    png = ctx.path("loss_curves.png")
    fig.savefig(png + ".tmp.png", dpi=120)
    os.replace(png + ".tmp.png", png)
    plt.close(fig)
    a, v = ctx.results.get("alcot", {}), ctx.results.get("vanilla", {})
    if a and v:
        print(f"  validation perplexity: ALCoT {a['valid_ppl']:.2f}, vanilla {v['valid_ppl']:.2f}")
        share = " ".join(f"{k}:{s:.3f}" for k, s in enumerate(a["valid_depth_share"] or []))
        print(f"  ALCoT mean executed latent steps (validation): {a['valid_mean_latent_steps']:.3f}; "
              f"share of tokens at depth {share}")
    print(f"  -> {png}")


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
    Stage("train_vanilla", "Train the vanilla model of the same size on the same tokens",
          stage_train_vanilla),
    Stage("report", "Report", stage_report),
]


def write_results(ctx: Context) -> str:
    path = ctx.path("results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(ctx.results, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_alcot.quickstart",
                                description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default="quickstart_out")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--train-iters", type=int, default=300)
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--latent-max-steps", type=int, default=3)
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="train in fp32 (bf16 autocast is the default; faster on CPUs with avx512_bf16)")
    p.add_argument("--stages", nargs="*", default=None,
                   help=f"run only these stages (of {', '.join(s.name for s in STAGES)})")
    return p


def main(argv=None) -> int:
    opts = build_parser().parse_args(argv)
    os.makedirs(opts.output_dir, exist_ok=True)
    ctx = Context(out=opts.output_dir, opts=opts)
    results_path = ctx.path("results.json")
    if os.path.exists(results_path):
        with open(results_path) as f:
            ctx.results = json.load(f)
    start = time.time()
    selected = [s for s in STAGES if opts.stages is None or s.name in opts.stages]
    for i, stage in enumerate(selected, 1):
        print(f"\n== [{i}/{len(selected)}] {stage.title} ({time.time() - start:.0f} s elapsed)",
              flush=True)
        stage.run(ctx)
        write_results(ctx)
    ctx.results["total_seconds"] = round(time.time() - start, 1)
    print(f"\nresults -> {write_results(ctx)} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
