"""Learning sanity on real text: loss falls, and the latent-loss weight λ (and β) steer how many
latent steps the router keeps.

    python bench/bench_learning.py --steps 400 --out docs/bench_learning.md

A tiny ALCoT model (2 layers, hidden 64, ℓmax = 3, τ = 0.1, router initialised at g = 0.9) is
trained with a plain torch AdamW loop on the bytes of the stdlib's ``pydoc_data.topics`` (English
help text, vocabulary = 256 byte values), once per λ in ``--lambdas`` (β = 1) and once per β in
``--betas`` (at λ = ``--beta-lambda``), plus a vanilla model (ℓmax = 0) for reference. Every run
uses the same initial weights (same seed) and the same batches. Reported per run: the training
loss at the start and end, the held-out LM loss and the mean executed latent steps (learned
halting, same rule as training) on fixed held-out windows, and the histogram of ℓ_t. Writes the
table and the curves (PNG, next to ``--out``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pydoc_data.topics  # noqa: E402
import torch  # noqa: E402

from megatron_alcot.model import build_model  # noqa: E402
from megatron_alcot.model.presets import preset  # noqa: E402


def byte_text() -> torch.Tensor:
    topics = pydoc_data.topics.topics
    return torch.tensor(list("".join(topics[k] for k in sorted(topics)).encode()), dtype=torch.int64)


def windows(data, starts, seq):
    rows = torch.stack([data[i:i + seq + 1] for i in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, batches):
    model.eval()
    losses, steps = [], []
    for tokens, labels in batches:
        out = model(tokens, labels=labels)
        losses.append(out.lm_loss.item())
        steps.append(out.num_steps.flatten())
    model.train()
    steps = torch.cat(steps)
    k = model.config.max_latent_steps
    return (sum(losses) / len(losses), steps.float().mean().item(),
            torch.bincount(steps, minlength=k + 1).tolist())


def train_run(args, data, split, held_out, **latent):
    cfg = preset("tiny", seq_length=args.seq, latent_max_steps=args.max_steps, **latent)
    model = build_model(cfg, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed)
    curve = []
    start = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        tokens, labels = windows(data, torch.randint(0, split - args.seq - 1, (args.batch,), generator=g),
                                 args.seq)
        out = model(tokens, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append((out.lm_loss.item(), out.num_steps.float().mean().item()))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            ev_loss, ev_steps, _ = evaluate(model, held_out)
            curve[-1] = curve[-1] + (ev_loss, ev_steps)
    ev_loss, ev_steps, hist = evaluate(model, held_out)
    return dict(curve=curve, eval_loss=ev_loss, eval_steps=ev_steps, hist=hist,
                seconds=time.time() - start)


def smooth(values, width=20):
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-width:]
        out.append(sum(acc) / len(acc))
    return out


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        ax1.plot(smooth([c[0] for c in run["curve"]]), label=name)
        ax2.plot(smooth([c[1] for c in run["curve"]]), label=name)
    ax1.set(xlabel="step", ylabel="train LM loss (nats/byte, 20-step mean)", ylim=(None, 4.0))
    ax2.set(xlabel="step", ylabel="mean executed latent steps (train batch)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _trend(values, down, up):
    if all(a > b for a, b in zip(values, values[1:])):
        return f"{down} monotonically"
    if all(a < b for a, b in zip(values, values[1:])):
        return f"{up} monotonically"
    return "not monotone"


def reading(runs, args):
    """Plain statements of what the table shows (computed, so they stay true on a rerun)."""
    lam = [(v, runs[f"λ={v:g}, β=1"]) for v in args.lambdas]
    steps = [r["eval_steps"] for _, r in lam]
    loss = [r["eval_loss"] for _, r in lam]
    end = [sum(c[0] for c in r["curve"][-20:]) / len(r["curve"][-20:]) for r in runs.values()]
    out = [f"* Every run's training loss falls from about ln 256 ≈ 5.5 to "
           f"{min(end):.2f}–{max(end):.2f} nats/byte (mean of the last 20 steps).",
           f"* λ = {', '.join(f'{v:g}' for v, _ in lam)}: held-out mean ℓ "
           f"{', '.join(f'{x:.2f}' for x in steps)} ({_trend(steps, 'falls', 'rises')} as λ rises); "
           f"held-out loss {', '.join(f'{x:.3f}' for x in loss)} ({_trend(loss, 'falls', 'rises')}; "
           "the paper reports more pruning and higher loss for larger λ).",
           f"* Vanilla (ℓmax = 0) held-out loss {runs['vanilla']['eval_loss']:.3f}; runs below it "
           f"at the same number of updates: "
           f"{', '.join(n for n, r in runs.items() if r['eval_loss'] < runs['vanilla']['eval_loss']) or 'none'}."]
    if args.betas:
        beta = [(v, runs[f"λ={args.beta_lambda:g}, β={v:g}"]) for v in args.betas]
        if f"λ={args.beta_lambda:g}, β=1" in runs:
            beta.append((1.0, runs[f"λ={args.beta_lambda:g}, β=1"]))
        beta.sort(key=lambda x: x[0])
        b_steps = ", ".join(f"{r['eval_steps']:.2f}" for _, r in beta)
        b_loss = ", ".join(f"{r['eval_loss']:.3f}" for _, r in beta)
        out.append(f"* β at λ = {args.beta_lambda:g}: β = {', '.join(f'{v:g}' for v, _ in beta)} "
                   f"gives mean ℓ {b_steps} and held-out loss {b_loss} (the paper reports less "
                   "pruning and lower loss for larger β).")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=3, help="ℓmax")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--lambdas", type=float, nargs="*", default=[0.0, 0.03, 0.1, 0.3])
    ap.add_argument("--betas", type=float, nargs="*", default=[0.5, 2.0])
    ap.add_argument("--beta-lambda", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "bench_learning.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = byte_text()
    split = int(0.9 * len(data))
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(split, len(data) - args.seq - 1, (64,), generator=g)
    held_out = [windows(data, starts[i:i + 16], args.seq) for i in range(0, 64, 16)]

    settings = {"vanilla": dict(latent_method="vanilla")}
    for lam in args.lambdas:
        settings[f"λ={lam:g}, β=1"] = dict(latent_loss_weight=lam, latent_loss_beta=1.0)
    for beta in args.betas:
        settings[f"λ={args.beta_lambda:g}, β={beta:g}"] = dict(latent_loss_weight=args.beta_lambda,
                                                               latent_loss_beta=beta)
    runs = {}
    for name, latent in settings.items():
        runs[name] = train_run(args, data, split, held_out, **latent)
        r = runs[name]
        print(f"{name:16s} eval loss {r['eval_loss']:.4f}  mean ℓ {r['eval_steps']:.3f}  "
              f"hist {r['hist']}  ({r['seconds']:.0f} s)", flush=True)

    base = os.path.splitext(args.out)[0]
    plot(runs, base + ".png")
    first = lambda r: sum(c[0] for c in r["curve"][:10]) / 10  # noqa: E731
    last = lambda r: sum(c[0] for c in r["curve"][-20:]) / 20  # noqa: E731
    rows = [f"| {name} | {first(r):.3f} | {last(r):.3f} | {r['eval_loss']:.4f} | "
            f"{r['eval_steps']:.3f} | {r['hist']} | {r['seconds']:.0f} |" for name, r in runs.items()]
    lines = [
        "# Learning sanity: loss falls, λ and β steer the latent steps",
        "",
        "Produced by `python bench/bench_learning.py` (numbers from that run). Tiny ALCoT model "
        f"(preset `tiny`: 2 layers, hidden 64, 4 heads / 2 KV groups, FFN 128), ℓmax = "
        f"{args.max_steps}, τ = 0.1, router init g = 0.9, byte vocabulary (256) on the stdlib's "
        f"`pydoc_data.topics` text ({len(data) / 1e6:.2f} MB; last 10 % held out), {args.steps} "
        f"AdamW steps (lr {args.lr:g}, warm-up {args.warmup}, cosine to 10 %, β = (0.9, 0.95), "
        f"weight decay 0.1, clip 1.0), batch {args.batch} × {args.seq} bytes, same init and "
        "batches for every run, CPU fp32.",
        "",
        "Held-out numbers: 64 fixed windows, learned halting with the training rule. Mean ℓ is "
        "the mean executed latent steps per token; the histogram counts tokens with ℓ = 0..ℓmax.",
        "",
        "| run | train loss, first 10 steps | train loss, last 20 steps | held-out LM loss | "
        "held-out mean ℓ | held-out ℓ histogram | seconds |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"![curves]({os.path.basename(base)}.png)",
        "",
        "## Reading",
        "",
        *reading(runs, args),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
