"""The report's PNG figures, drawn from run records only.

    paths = draw_all(results, docs_dir="docs")   # {"ppl_vs_flops": "docs/paper_ppl_vs_flops.png", ...}
"""
from __future__ import annotations

import math
import os
from typing import Dict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    return path


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def ppl_vs_flops(runs: Dict[str, dict], path: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rec in runs.values():
        if _finite(rec.get("valid_ppl")) and rec.get("train_flops"):
            ax.scatter(rec["train_flops"], rec["valid_ppl"], s=40)
            ax.annotate(rec["label"], (rec["train_flops"], rec["valid_ppl"]), fontsize=8,
                        xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (counted from what executed)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Perplexity vs training compute, same tokens")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def gap_over_training(runs: Dict[str, dict], path: str, names=("vanilla", "alcot3", "vanilla_2x")) -> str:
    fig, (ax, gap) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, height_ratios=(2, 1))
    for name in names:
        rec = runs.get(name)
        if not rec or not rec.get("evals"):
            continue
        xs = [e["tokens_seen"] for e in rec["evals"]]
        ys = [e["ppl"] for e in rec["evals"]]
        ax.plot(xs, ys, marker="o", label=rec["label"], linestyle="--" if name == "vanilla_2x" else "-")
    ax.set_yscale("log")
    ax.set_ylabel("validation perplexity (log)")
    ax.set_title("ALCoT vs vanilla during training")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    van = {e["iteration"]: e for e in runs.get("vanilla", {}).get("evals", [])}
    for name in names[1:]:
        rec = runs.get(name)
        pts = [(e["tokens_seen"], (e["ppl"] / van[e["iteration"]]["ppl"] - 1) * 100)
               for e in (rec or {}).get("evals", []) if e["iteration"] in van]
        if pts:
            gap.plot(*zip(*pts), marker="o", label=rec["label"], linestyle="--" if name == "vanilla_2x" else "-",
                     color=f"C{names.index(name)}")
    gap.axhline(0, color="black", lw=0.8)
    gap.set_xlabel("training tokens seen")
    gap.set_ylabel("perplexity vs vanilla (%)")
    gap.grid(alpha=0.3)
    return _save(fig, path)


def sweep(points: Dict[str, dict], path: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rec in points.values():
        x, y = rec.get("valid_mean_latent_steps"), rec.get("valid_ppl")
        if _finite(x) and _finite(y):
            ax.scatter(x, y, s=40)
            ax.annotate(f"λ={rec['lambda']:g} β={rec['beta']:g}", (x, y), fontsize=8,
                        xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("mean executed latent steps per validation token (lower = more pruning)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("ALCoT ℓmax=3: pruning vs quality over λ, β")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def difficulty(diff: dict, path: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("bins_vanilla_prob", "vanilla model's p(target)"),
                       ("bins_own_prob", "ALCoT's own p(target)")):
        rows = [r for r in diff[key] if r[2] > 0]
        ax.plot([(lo + hi) / 2 for lo, hi, _, _ in rows], [m for *_, m in rows], marker="o", label=label)
    ax.set_xlabel("target probability (bin centre)")
    ax.set_ylabel("mean executed latent steps (ALCoT ℓmax=3)")
    ax.set_title(f"Latent steps vs token difficulty (Spearman ρ with vanilla loss "
                 f"{diff['spearman_steps_vs_vanilla_loss']:.3f})")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def depth_histograms(runs: Dict[str, dict], path: str) -> str:
    adaptive = [r for r in runs.values() if r.get("method") == "alcot" and r.get("valid_depth_share")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(len(adaptive), 1)
    for i, rec in enumerate(adaptive):
        share = rec["valid_depth_share"]
        ax.bar([k + i * width for k in range(len(share))], share, width=width, label=rec["label"])
    ax.set_xlabel("executed latent steps ℓ")
    ax.set_ylabel("share of validation tokens")
    ax.set_title("Depth histograms")
    ax.legend(fontsize=8)
    return _save(fig, path)


def draw_all(results: dict, docs_dir: str) -> Dict[str, str]:
    os.makedirs(docs_dir, exist_ok=True)
    runs = results.get("runs", {})
    out = {"ppl_vs_flops": ppl_vs_flops(runs, os.path.join(docs_dir, "paper_ppl_vs_flops.png")),
           "gap": gap_over_training(runs, os.path.join(docs_dir, "paper_gap_over_training.png")),
           "depth": depth_histograms(runs, os.path.join(docs_dir, "paper_depth_histograms.png"))}
    if results.get("sweep"):
        out["sweep"] = sweep(results["sweep"], os.path.join(docs_dir, "paper_sweep.png"))
    if results.get("difficulty"):
        out["difficulty"] = difficulty(results["difficulty"], os.path.join(docs_dir, "paper_difficulty.png"))
    return out
