"""The statistics of the report: Spearman correlation, binned means, depth histograms.

    rho, p, n = spearman(steps, vanilla_loss)                       # scipy.stats.spearmanr, masked
    rows = binned_mean(vanilla_prob, steps, edges=PROB_EDGES)       # [(lo, hi, count, mean)]
    hist = depth_histogram(steps, mask, max_steps=3)                # share of tokens at ℓ = 0..3
    diff = difficulty_analysis(alcot_tokens, vanilla_tokens)        # everything the report shows

Token arrays come from :func:`bench.paper.runs.load_tokens`: the final validation pass of each run,
flattened in the same sample order for every method (same data, split, seed and batch), so token i
of the ALCoT run and token i of the vanilla run are the same validation token.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np

PROB_EDGES = (0.0, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)


def spearman(x: Sequence[float], y: Sequence[float]) -> Tuple[float, float, int]:
    """``(rho, p_value, n)`` of ``scipy.stats.spearmanr`` over the finite pairs; NaN when undefined."""
    from scipy.stats import spearmanr
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan"), float("nan"), int(x.size)
    r = spearmanr(x, y)
    return float(r.statistic), float(r.pvalue), int(x.size)


def binned_mean(key: Sequence[float], value: Sequence[float], edges: Sequence[float] = PROB_EDGES
                ) -> List[Tuple[float, float, int, float]]:
    """Mean of ``value`` over the entries whose ``key`` lies in ``[lo, hi)`` (last bin closed).

        binned_mean([0.0, 0.5, 1.0], [1, 2, 3], edges=(0, 0.5, 1)) == [(0, 0.5, 1, 1.0), (0.5, 1, 2, 2.5)]
    """
    key, value = np.asarray(key, dtype=np.float64), np.asarray(value, dtype=np.float64)
    rows = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        last = i == len(edges) - 2
        sel = (key >= lo) & ((key <= hi) if last else (key < hi))
        n = int(sel.sum())
        rows.append((lo, hi, n, float(value[sel].mean()) if n else float("nan")))
    return rows


def depth_histogram(steps: Sequence[int], mask: Sequence[float], max_steps: int) -> List[float]:
    """Share of (loss-masked) tokens that executed exactly ℓ = 0..max_steps latent steps."""
    steps = np.asarray(steps, dtype=np.int64)
    keep = np.asarray(mask, dtype=np.float64) > 0
    counts = np.bincount(steps[keep], minlength=max_steps + 1)[: max_steps + 1].astype(np.float64)
    total = counts.sum()
    return (counts / total).tolist() if total else [float("nan")] * (max_steps + 1)


def difficulty_analysis(alcot: dict, vanilla: dict, edges: Sequence[float] = PROB_EDGES) -> dict:
    """ALCoT's latent steps against the vanilla model's loss / target probability on each token."""
    n = min(alcot["steps"].size, vanilla["loss"].size)
    if alcot["steps"].size != vanilla["loss"].size:
        raise ValueError(f"validation passes differ in length ({alcot['steps'].size} vs "
                         f"{vanilla['loss'].size} tokens): the runs did not see the same tokens")
    if "labels" in alcot and "labels" in vanilla and alcot["labels"].size == n == vanilla["labels"].size \
            and not np.array_equal(alcot["labels"], vanilla["labels"]):
        raise ValueError("the validation tokens of the two runs differ")
    keep = (alcot["mask"][:n] > 0) & (vanilla["mask"][:n] > 0)
    steps = alcot["steps"][:n][keep].astype(np.float64)
    v_loss = vanilla["loss"][:n][keep].astype(np.float64)
    a_loss = alcot["loss"][:n][keep].astype(np.float64)
    rho_v, p_v, count = spearman(steps, v_loss)
    rho_a, p_a, _ = spearman(steps, a_loss)
    g0 = alcot.get("continue_prob0")
    rho_g = spearman(g0[:n][keep], v_loss)[0] if g0 is not None and g0.size == alcot["steps"].size \
        else float("nan")
    return {
        "spearman_router_prob_vs_vanilla_loss": rho_g,
        "tokens": count,
        "spearman_steps_vs_vanilla_loss": rho_v, "p_value_vanilla": p_v,
        "spearman_steps_vs_own_loss": rho_a, "p_value_own": p_a,
        "bins_vanilla_prob": binned_mean(np.exp(-v_loss), steps, edges),
        "bins_own_prob": binned_mean(np.exp(-a_loss), steps, edges),
        "mean_steps": float(steps.mean()) if steps.size else float("nan"),
        "vanilla_nll": float(v_loss.mean()), "alcot_nll": float(a_loss.mean()),
        "mean_alcot_prob": float(np.exp(-a_loss).mean()) if a_loss.size else float("nan"),
    }


def ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))
