"""docs/paper_table.md, rendered from results.json alone (every number comes from a run record).

    text = render(results, figures={"ppl_vs_flops": "paper_ppl_vs_flops.png", ...})

Sections whose numbers depend on the seed (tables, analyses) are separate from the run record
(wall times, machine load), so two runs with the same seed give the same tables.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

from bench.paper.presets import flag_value


def _f(x, fmt="{:.2f}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return fmt.format(x)


def _flops(x) -> str:
    return "n/a" if not x else f"{x:.3e}"


def _share(share) -> str:
    return " / ".join(f"{s:.2f}" for s in share) if share else "n/a"


def _rel(a, b) -> Optional[float]:
    if a is None or b is None or not b:
        return None
    return (a / b - 1.0) * 100.0


def _verdict(ppl, ref_ppl, name="ALCoT", ref="vanilla") -> str:
    d = _rel(ppl, ref_ppl)
    if d is None:
        return "n/a"
    if d < 0:
        return f"{name} better by {-d:.1f}%"
    return f"{name} **not better**: {d:+.1f}% perplexity vs {ref}"


def main_table(runs: Dict[str, dict]) -> List[str]:
    van = runs.get("vanilla", {})
    lines = ["| method | layers | non-emb. params | valid ppl | vs vanilla | training FLOPs | FLOPs / vanilla "
             "| tokens seen | mean latent steps | depth share ℓ=0/1/… |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rec in runs.values():
        rel = _rel(rec.get("valid_ppl"), van.get("valid_ppl"))
        fr = rec["train_flops"] / van["train_flops"] if van.get("train_flops") else None
        adaptive = rec.get("method") == "alcot"
        lines.append(
            f"| {rec['label']} | {rec['num_layers']} | {rec['non_embedding_parameters']:,} | "
            f"{_f(rec.get('valid_ppl'))} | {_f(rel, '{:+.1f}%')} | {_flops(rec.get('train_flops'))} | "
            f"{_f(fr, '{:.2f}x')} | {rec['tokens_seen']:,} | "
            f"{_f(rec.get('valid_mean_latent_steps'), '{:.3f}') if adaptive else rec.get('latent_max_steps', 0) if rec.get('method') != 'vanilla' else 0} | "
            f"{_share(rec.get('valid_depth_share')) if adaptive else '—'} |")
    return lines


def findings(results: dict) -> List[str]:
    runs = results.get("runs", {})
    van, out = runs.get("vanilla"), []
    if not van:
        return out
    for name, rec in runs.items():
        if name == "vanilla" or rec.get("valid_ppl") is None:
            continue
        rel = _rel(rec["valid_ppl"], van["valid_ppl"])
        word = "lower" if rel < 0 else "higher"
        fr = rec["train_flops"] / van["train_flops"] if van.get("train_flops") else float("nan")
        out.append(f"- {rec['label']}: perplexity {rec['valid_ppl']:.2f} vs vanilla {van['valid_ppl']:.2f} "
                   f"({abs(rel):.1f}% {word}) at {fr:.2f}x vanilla's training FLOPs.")
    a3, x2 = runs.get("alcot3"), runs.get("vanilla_2x")
    if a3 and x2 and x2.get("valid_ppl"):
        out.append(f"- Compute-matched reference: ALCoT ℓmax=3 {a3['valid_ppl']:.2f} vs the 2x-layer vanilla "
                   f"{x2['valid_ppl']:.2f} ({_verdict(a3['valid_ppl'], x2['valid_ppl'], ref='2x vanilla')}); "
                   f"FLOPs ratio ALCoT / 2x vanilla = {a3['train_flops'] / x2['train_flops']:.2f}.")
    return out


def sweep_table(sweep: Dict[str, dict], runs: Dict[str, dict]) -> List[str]:
    van = runs.get("vanilla", {})
    lines = ["| λ | β | valid ppl | vs vanilla | mean latent steps | executed share of ℓmax | depth share ℓ=0/1/2/3 "
             "| training FLOPs | ρ(steps, vanilla loss) |", "|---|---|---|---|---|---|---|---|---|"]
    for rec in sorted(sweep.values(), key=lambda r: (r["lambda"], r["beta"])):
        m = rec.get("valid_mean_latent_steps")
        lines.append(f"| {rec['lambda']:g} | {rec['beta']:g} | {_f(rec.get('valid_ppl'))} | "
                     f"{_f(_rel(rec.get('valid_ppl'), van.get('valid_ppl')), '{:+.1f}%')} | {_f(m, '{:.3f}')} | "
                     f"{_f(m / 3 if m is not None else None, '{:.2f}')} | {_share(rec.get('valid_depth_share'))} | "
                     f"{_flops(rec.get('train_flops'))} | {_f(rec.get('spearman_vs_vanilla'), '{:.3f}')} |")
    return lines


def alcot_loss_sentence(rec: Optional[dict]) -> str:
    """The ALCoT runs' adaptive-loss settings, read from the run's own flags."""
    if not rec or not rec.get("argv"):
        return ""
    argv = rec["argv"]
    lam = flag_value(argv, "--latent-loss-weight", "0.03")
    beta = flag_value(argv, "--latent-loss-beta", "1")
    scope = flag_value(argv, "--latent-loss-scope", "continued")
    tau = flag_value(argv, "--latent-threshold", "0.1")
    return (f" ALCoT (both ℓmax) trains with λ={lam}, β={beta}, τ={tau} and the penalty on every router "
            f"decision (`--latent-loss-scope {scope}`)" if scope == "decided" else
            f" ALCoT (both ℓmax) trains with λ={lam}, β={beta}, τ={tau}, penalty scope `{scope}`") + (
            "; these settings were picked from the sweeps and variants, which read the validation splits of "
            "this corpus and of two others (see `bench/paper/presets.py`), so none of the three is untuned "
            "for them: rerun with `--input` on another corpus to test them.")


def lambda_monotone(sweep: Dict[str, dict]) -> Optional[bool]:
    """Whether mean latent steps fall strictly as λ rises at the sweep's most common β (None: < 3 points)."""
    by_beta: Dict[float, list] = {}
    for r in sweep.values():
        if r.get("valid_mean_latent_steps") is not None:
            by_beta.setdefault(r["beta"], []).append(r)
    if not by_beta:
        return None
    rs = sorted(max(by_beta.values(), key=len), key=lambda r: r["lambda"])
    if len(rs) < 3:
        return None
    steps = [r["valid_mean_latent_steps"] for r in rs]
    return all(a > b for a, b in zip(steps, steps[1:]))


def difficulty_section(diff: dict) -> List[str]:
    lines = [f"Validation tokens analysed: {diff['tokens']:,} (the final validation pass of both runs, "
             "same tokens in the same order).", "",
             "| statistic | value |", "|---|---|",
             f"| Spearman ρ(ALCoT ℓmax=3 latent steps, vanilla loss) | {_f(diff['spearman_steps_vs_vanilla_loss'], '{:.4f}')} "
             f"(p = {_f(diff['p_value_vanilla'], '{:.2g}')}) |",
             f"| Spearman ρ(latent steps, ALCoT's own loss) | {_f(diff['spearman_steps_vs_own_loss'], '{:.4f}')} "
             f"(p = {_f(diff['p_value_own'], '{:.2g}')}) |",
             f"| Spearman ρ(first router's continue probability g_0, vanilla loss) | "
             f"{_f(diff.get('spearman_router_prob_vs_vanilla_loss', float('nan')), '{:.4f}')} |",
             f"| mean latent steps | {_f(diff['mean_steps'], '{:.3f}')} |", "",
             "| target-probability bin | tokens (by vanilla p) | mean steps | tokens (by ALCoT p) | mean steps |",
             "|---|---|---|---|---|"]
    for (lo, hi, n1, m1), (_, _, n2, m2) in zip(diff["bins_vanilla_prob"], diff["bins_own_prob"]):
        lines.append(f"| [{lo:g}, {hi:g}{']' if hi >= 1 else ')'} | {n1:,} | {_f(m1, '{:.3f}')} | {n2:,} | "
                     f"{_f(m2, '{:.3f}')} |")
    rho = diff["spearman_steps_vs_vanilla_loss"]
    if isinstance(rho, float) and math.isfinite(rho):
        sign = "more" if rho > 0 else "fewer"
        lines += ["", f"Reading: harder tokens (higher vanilla loss) get {sign} latent steps; |ρ| = "
                  f"{abs(rho):.3f} says how strongly the router tracks difficulty at this scale."]
        bins = [b for b in diff["bins_vanilla_prob"] if b[2] > 0]
        if len(bins) >= 3:
            low = min(bins[1:-1], key=lambda b: b[3])
            lines[-1] += (f" Hardest bin (vanilla p < {bins[0][1]:g}): {bins[0][3]:.3f} steps; easiest bin "
                          f"(p ≥ {bins[-1][0]:g}): {bins[-1][3]:.3f}; lowest in between: {low[3]:.3f} at "
                          f"[{low[0]:g}, {low[1]:g}).")
            falls = sum(a[3] >= b[3] for a, b in zip(bins, bins[1:]))
            lines[-1] += (f" From the hardest bin to the easiest, the mean steps fall or stay level at {falls} of "
                          f"{len(bins) - 1} bin boundaries.")
            rho_g = diff.get("spearman_router_prob_vs_vanilla_loss", float("nan"))
            if isinstance(rho_g, float) and math.isfinite(rho_g) and rho_g > rho:
                lines[-1] += (f" The first router's continuous continue probability tracks difficulty better "
                              f"(ρ = {rho_g:.3f}) than the step counts do: the threshold τ on the reach turns it "
                              "into a few depth levels and the ties lose part of the ranking.")
            if bins[-1][3] > low[3] and bins[0][3] > low[3]:
                lines[-1] += (" The relation is U-shaped, not monotone: the tokens the model is most sure of also "
                              "run long, so the router is not yet the difficulty detector the paper describes.")
    return lines


def gap_table(runs: Dict[str, dict]) -> List[str]:
    van, alc = runs.get("vanilla"), runs.get("alcot3")
    if not (van and alc and van.get("evals") and alc.get("evals")):
        return ["(needs the vanilla and ALCoT ℓmax=3 runs)"]
    x2 = {e["iteration"]: e for e in runs.get("vanilla_2x", {}).get("evals", [])}
    by_it = {e["iteration"]: e for e in alc["evals"]}
    lines = ["| tokens seen | vanilla ppl | ALCoT ℓmax=3 ppl | ALCoT vs vanilla | ALCoT mean steps | 2x vanilla ppl |",
             "|---|---|---|---|---|---|"]
    for e in van["evals"]:
        a = by_it.get(e["iteration"])
        if not a:
            continue
        lines.append(f"| {e['tokens_seen']:,} | {e['ppl']:.2f} | {a['ppl']:.2f} | {_rel(a['ppl'], e['ppl']):+.1f}% | "
                     f"{_f(a.get('mean_latent_steps'), '{:.3f}')} | "
                     f"{_f(x2.get(e['iteration'], {}).get('ppl'))} |")
    return lines


def investigate_table(inv: Dict[str, dict], runs: Dict[str, dict], rho: Optional[float] = None) -> List[str]:
    lines = ["| variant | valid ppl | reference (same recipe) | vs reference | mean latent steps "
             "| ρ(steps, vanilla loss) | training FLOPs | tokens seen |", "|---|---|---|---|---|---|---|---|"]
    pool = dict(runs, **inv)
    table_run = runs.get("alcot3")
    if table_run and rho is not None:
        table_run = dict(table_run, spearman_vs_vanilla=rho)
    rows = [("ALCoT ℓmax=3 (the table's run)", table_run, runs.get("vanilla"))]
    rows += [(rec["label"], rec, pool.get(rec.get("reference", "vanilla"))) for rec in inv.values()]
    for label, rec, ref in rows:
        if not rec:
            continue
        who = "ALCoT" if rec.get("method") == "alcot" else "this vanilla"
        if rec.get("failed"):
            lines.append(f"| {label} | **failed** | {_f(ref.get('valid_ppl') if ref else None)} "
                         f"({ref['label'] if ref else 'n/a'}) | "
                         f"diverged: {rec['failed'].split(';')[0]} "
                         f"| — | — | {_flops(rec.get('train_flops'))} (executed before stopping) | "
                         f"{rec.get('tokens_seen') or 0:,} |")
            continue
        lines.append(f"| {label} | {_f(rec.get('valid_ppl'))} | {_f(ref.get('valid_ppl') if ref else None)} "
                     f"({ref['label'] if ref else 'n/a'}) | "
                     f"{_verdict(rec.get('valid_ppl'), ref.get('valid_ppl') if ref else None, name=who, ref='reference')} | "
                     f"{_f(rec.get('valid_mean_latent_steps'), '{:.3f}') if rec.get('method') == 'alcot' else '—'} | "
                     f"{_f(rec.get('spearman_vs_vanilla'), '{:.3f}') if rec.get('method') == 'alcot' else '—'} | "
                     f"{_flops(rec.get('train_flops'))} | {rec['tokens_seen']:,} |")
    return lines


def _gap(rec, ref) -> Optional[float]:
    return _rel(rec.get("valid_ppl") if rec else None, ref.get("valid_ppl") if ref else None)


def investigate_findings(inv: Dict[str, dict], runs: Dict[str, dict]) -> List[str]:
    """One computed sentence per variant: does it narrow ALCoT's gap to its vanilla reference?"""
    base = _gap(runs.get("alcot3"), runs.get("vanilla"))
    if base is None:
        return []
    out = [f"- Gap of the table's run (ALCoT ℓmax=3 vs vanilla): {base:+.1f}% perplexity (negative: ALCoT better)."]
    pool = dict(runs, **inv)
    for rec in inv.values():
        if rec.get("method") != "alcot":
            continue
        if rec.get("failed"):
            out.append(f"- {rec['label']}: training diverged ({rec['failed'].split(';')[0]}).")
            continue
        ref = pool.get(rec.get("reference", "vanilla"))
        g = _gap(rec, ref)
        if g is None:
            continue
        change = ("leaves the gap unchanged" if abs(g - base) < 0.5 else
                  "moves the gap in ALCoT's favour" if g < base else "moves the gap against ALCoT")
        steps = rec.get("valid_mean_latent_steps")
        out.append(f"- {rec['label']}: {g:+.1f}% vs {ref['label']} ({change}; "
                   f"{_f(steps, '{:.2f}')} latent steps per token).")
    return out


def summary(results: dict) -> List[str]:
    """Computed statements about the main question: does ALCoT beat vanilla here, and what moves."""
    runs = results.get("runs", {})
    van, a3 = runs.get("vanilla"), runs.get("alcot3")
    if not (van and a3):
        return []
    g = _gap(a3, van)
    out = [f"- At equal tokens and parameters ALCoT ℓmax=3 is "
           f"{'better' if g < 0 else 'worse'} than vanilla ({g:+.1f}% perplexity), with "
           f"{a3['train_flops'] / van['train_flops']:.2f}x its training FLOPs."]
    m = a3.get("valid_mean_latent_steps")
    if m is not None:
        out.append(f"- The router executes {m:.2f} of 3 possible latent steps per validation token "
                   f"({m / 3:.0%} of the unpruned latent compute).")
    sw = results.get("sweep", {})
    if len(sw) >= 2:
        steps = [r.get("valid_mean_latent_steps") for r in sw.values() if r.get("valid_mean_latent_steps") is not None]
        ppls = [r.get("valid_ppl") for r in sw.values() if r.get("valid_ppl") is not None]
        out.append(f"- Across the λ/β sweep the mean latent steps range over {min(steps):.2f}–{max(steps):.2f} and "
                   f"perplexity over {min(ppls):.2f}–{max(ppls):.2f}.")
    diff = results.get("difficulty") or {}
    rho = diff.get("spearman_steps_vs_vanilla_loss")
    if isinstance(rho, float) and math.isfinite(rho):
        out.append(f"- Difficulty tracking: Spearman ρ(latent steps, vanilla loss) = {rho:.3f} over "
                   f"{diff.get('tokens', 0):,} validation tokens ({'meets' if rho >= 0.3 else 'misses'} the "
                   "target ρ ≥ 0.3).")
    mono = lambda_monotone(sw)
    if mono is not None:
        out.append(f"- Mean latent steps {'fall' if mono else 'do not fall'} monotonically as λ rises "
                   "(sweep at fixed β).")
    for name, label in (("loop", "loop"), ("pause", "pause"), ("ponder", "PonderLM")):
        other = runs.get(name)
        if other and other.get("valid_ppl") and a3.get("valid_ppl"):
            better = a3["valid_ppl"] <= other["valid_ppl"]
            cheaper = a3["train_flops"] <= other["train_flops"]
            out.append(f"- Against {label}: ALCoT ℓmax=3 perplexity {'no higher' if better else '**higher**'} "
                       f"({a3['valid_ppl']:.2f} vs {other['valid_ppl']:.2f}) with "
                       f"{'no more' if cheaper else '**more**'} training FLOPs "
                       f"({a3['train_flops'] / other['train_flops']:.2f}x).")
    x2 = runs.get("vanilla_2x")
    if x2:
        out.append(f"- The 2x-layer vanilla reaches {x2['valid_ppl']:.2f} "
                   f"({_gap(x2, van):+.1f}% vs vanilla) at {x2['train_flops'] / van['train_flops']:.2f}x vanilla's "
                   f"FLOPs; ALCoT ℓmax=3 is {_gap(a3, x2):+.1f}% against it.")
    return out


def sweep_trends(sweep: Dict[str, dict]) -> str:
    """Direction of λ (at fixed β) and β (at fixed λ) against the paper's reported trends."""
    recs = [r for r in sweep.values() if r.get("valid_mean_latent_steps") is not None and r.get("valid_ppl")]
    text = ""
    for vary, fixed, paper_steps in (("lambda", "beta", "fewer"), ("beta", "lambda", "more")):
        groups: Dict[float, list] = {}
        for r in recs:
            groups.setdefault(r[fixed], []).append(r)
        for value, rs in sorted(groups.items()):
            if len(rs) < 2:
                continue
            lo, hi = min(rs, key=lambda r: r[vary]), max(rs, key=lambda r: r[vary])
            d_steps = hi["valid_mean_latent_steps"] - lo["valid_mean_latent_steps"]
            d_ppl = hi["valid_ppl"] - lo["valid_ppl"]
            steps_word = "fewer" if d_steps < 0 else "more"
            quality = "worse" if d_ppl > 0 else "better"
            expected_quality = "worse" if paper_steps == "fewer" else "better"
            match = "as the paper reports" if (steps_word, quality) == (paper_steps, expected_quality) \
                else "not the paper's reported direction"
            sym = "λ" if vary == "lambda" else "β"
            other = "β" if vary == "lambda" else "λ"
            text += (f" Raising {sym} from {lo[vary]:g} to {hi[vary]:g} at {other}={value:g} gives {steps_word} "
                     f"latent steps ({lo['valid_mean_latent_steps']:.2f} → {hi['valid_mean_latent_steps']:.2f}) "
                     f"and {quality} perplexity ({lo['valid_ppl']:.2f} → {hi['valid_ppl']:.2f}), {match}.")
    return text


def interpretation(results: dict) -> List[str]:
    """What the numbers suggest, as rules over the measured values (no number is typed in)."""
    runs, out = results.get("runs", {}), []
    van, a3, loop, x2 = (runs.get(k) for k in ("vanilla", "alcot3", "loop", "vanilla_2x"))
    if not (van and a3):
        return out
    gap = _gap(a3, van)
    fr = a3["train_flops"] / van["train_flops"]
    if gap >= 0:
        out.append("- ALCoT does **not** beat vanilla at this scale: the table says so above.")
    else:
        out.append(f"- At equal tokens ALCoT ℓmax=3 beats vanilla ({gap:+.1f}%), but it spends {fr:.2f}x "
                   "vanilla's training FLOPs; equal tokens is not equal compute.")
    pairs = [(e, next((a for a in a3.get("evals", []) if a["iteration"] == e["iteration"]), None))
             for e in van.get("evals", [])]
    pts = [(v["tokens_seen"], _rel(a["ppl"], v["ppl"])) for v, a in pairs if a]
    if len(pts) >= 2:
        peak = max(pts, key=lambda p: abs(p[1]))
        who = "ALCoT's advantage" if gap < 0 else "ALCoT's deficit"
        text = (f"- {who} over training (one cosine run): {pts[0][1]:+.1f}% at {pts[0][0]:,} tokens, largest "
                f"{peak[1]:+.1f}% at {peak[0]:,}, {pts[-1][1]:+.1f}% at the end ({pts[-1][0]:,}).")
        if abs(pts[-1][1]) < abs(peak[1]):
            text += (" It has been shrinking since its peak, so part of it is a head start in optimisation; a "
                     "longer run is needed to say where it settles.")
        out.append(text)
    share = a3.get("valid_depth_share") or []
    first = next((k for k, x in enumerate(share) if x > 0.001), None)
    if first:
        line = (f"- No validation token (beyond 0.1%) stops before {first} latent step{'s' if first > 1 else ''}: "
                "the router has not learned zero-length trajectories for easy tokens")
        if first == len(share) - 2:
            line += "; the pruning it does is at the last step"
        zero = sorted(r["lambda"] for r in results.get("sweep", {}).values()
                      if (r.get("valid_depth_share") or [0])[0] > 0.001)
        line += (f". In the sweep they appear from λ = {zero[0]:g} on." if zero else ".")
        out.append(line)
    for other, label in ((loop, "loop (K=3)"), (runs.get("alcot5"), "ALCoT ℓmax=5"), (runs.get("ponder"), "PonderLM")):
        if other and other is not a3 and _gap(a3, other) is not None:
            out.append(f"- ALCoT ℓmax=3 vs {label}: {_gap(a3, other):+.1f}% perplexity at "
                       f"{a3['train_flops'] / other['train_flops']:.2f}x its FLOPs.")
    if x2 and _gap(x2, van) is not None:
        if _gap(x2, van) < 0:
            out.append(f"- The 2x-layer vanilla is better than vanilla ({_gap(x2, van):+.1f}%).")
        else:
            out.append(f"- The 2x-layer vanilla is not better than vanilla ({_gap(x2, van):+.1f}%): at this token "
                       "budget extra parameters do not buy quality, so it is a weak compute-matched reference "
                       "here.")
    inv = results.get("investigate", {})
    long_a, long_v = inv.get("inv_alcot_2xiters"), inv.get("inv_vanilla_2xiters")
    if long_a and long_v and _gap(long_a, long_v) is not None:
        g2 = _gap(long_a, long_v)
        move = "shrinks" if abs(g2) < abs(gap) else "grows"
        out.append(f"- Training length: with twice the tokens (a full cosine run of {long_a['tokens_seen']:,} tokens) "
                   f"the ALCoT–vanilla gap is {g2:+.1f}% against {gap:+.1f}% in the table: it {move} with tokens.")
    scaled = inv.get("inv_vanilla_embed_scaled")
    if scaled and scaled.get("valid_ppl"):
        out.append(f"- Input-scale control: vanilla with ALCoT's embedding scale reaches {scaled['valid_ppl']:.2f} "
                   f"({_gap(scaled, van):+.1f}% vs plain vanilla); ALCoT ℓmax=3 is {_gap(a3, scaled):+.1f}% against "
                   "it. The part of ALCoT's gap to plain vanilla that this control closes is due to the input "
                   "scale, not to the latent steps.")
    sw = [r for r in results.get("sweep", {}).values() if r.get("valid_mean_latent_steps") is not None]
    if len(sw) >= 2:
        steps = [r["valid_mean_latent_steps"] for r in sw]
        spread = max(steps) - min(steps)
        line = f"- λ/β {'barely moves' if spread < 0.25 else 'moves'} the router (mean latent steps span " \
               f"{spread:.2f} across the sweep)."
        line += sweep_trends(results.get("sweep", {}))
        prob = (results.get("difficulty") or {}).get("mean_alcot_prob")
        if spread < 0.25 and prob is not None:
            line += (" The adaptive term weights each continued step by sg(p(target))^β, and the mean "
                     f"validation p(target) of the ALCoT model is only {prob:.3f}, so its pull on the "
                     "router is weak this early in training.")
        out.append(line)
    pool = dict(runs, **inv)
    helped = [r["label"] for r in inv.values() if r.get("method") == "alcot"
              and _gap(r, pool.get(r.get("reference", "vanilla"))) is not None
              and _gap(r, pool.get(r.get("reference", "vanilla"))) < gap]
    if any(r.get("method") == "alcot" for r in inv.values()):
        out.append("- ALCoT variants that do better against their vanilla reference than the table's ALCoT: "
                   + (", ".join(helped) if helped else "none") + ".")
    return out


def run_record(results: dict) -> List[str]:
    meta = results.get("meta", {})
    lines = [f"- Command: `{meta.get('command', 'n/a')}`",
             f"- Preset: `{meta.get('preset')}` ({meta.get('preset_description', '')}); seed {meta.get('seed')}; "
             f"torch threads per run {meta.get('threads')}, {meta.get('jobs', 1)} runs side by side; precision {'bf16 autocast' if meta.get('bf16') else 'fp32'}",
             f"- Config (commit-independent; each run's full flag list is in results.json under --output-dir): "
             f"`{json.dumps(meta.get('config', {}), sort_keys=True)}`",
             f"- Machine: {meta.get('cpu_model', 'n/a')} [{meta.get('cpu_isa', 'ISA flags not recorded')}], "
             f"{meta.get('cores')} cores visible, torch "
             f"{meta.get('torch')}, load average at start {meta.get('load_average_start', 'n/a')} "
             "(other jobs shared these cores, so times are pessimistic)",
             f"- Wall time: total {_f(meta.get('total_seconds'), '{:.0f}')} s; per stage: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in meta.get("stage_seconds", {}).items()),
             "- Wall time per group of runs (first start to last finish, runs side by side): "
             + ", ".join(f"{ {'runs': 'the table', 'sweep': 'the sweep', 'investigate': 'the variants', 'all': 'all training'}[k]} "
                         f"({v['runs']} runs) {v['seconds'] / 60:.1f} min"
                         for k, v in meta.get("group_wall_seconds", {}).items()),
             "- Per run (s): " + ", ".join(f"{name} {sec:.0f}" for name, sec in {
                 r["name"]: r["seconds"] for group in ("runs", "sweep", "investigate")
                 for r in results.get(group, {}).values() if "seconds" in r}.items())]
    reused = [r["name"] for g in ("runs", "sweep", "investigate") for r in results.get(g, {}).values()
              if r.get("reused")]
    if reused:
        lines.append(f"- {len(set(reused))} runs were reused from earlier invocations (each record is reused only "
                     "when its run's flags and the trainer's source fingerprint are identical); their wall "
                     "times are those of the invocation that trained them.")
    for name, d in (results.get("determinism") or {}).items():
        lines.append(f"- Determinism: `{name}` trained a second time from scratch gave "
                     f"{'identical' if d['identical'] else '**different**'} numbers (valid ppl "
                     f"{d['valid_ppl'][0]!r} vs {d['valid_ppl'][1]!r}; loss curve, FLOPs, evaluations compared).")
    return lines


def render(results: dict, figures: Dict[str, str]) -> str:
    meta, data = results.get("meta", {}), results.get("data", {})
    cfg = meta.get("config", {})
    fig = {k: os.path.basename(v) for k, v in figures.items()}
    out = ["# The paper's comparison in miniature", "",
           "Generated by `bench/paper_table.py` from its own run records (`results.json`); nothing here is "
           "typed in. Rerunning the command below with the same seed reproduces every table (the run "
           "record at the end holds the wall times, which vary).", "",
           f"**Preset `{meta.get('preset')}`**: {cfg.get('num_layers')} layers × hidden {cfg.get('hidden_size')} "
           f"({cfg.get('num_attention_heads')} heads, FFN {cfg.get('ffn_hidden_size')}), sequence {cfg.get('seq_length')}, "
           f"global batch {cfg.get('global_batch_size')}, {cfg.get('iters')} iterations, lr {cfg.get('lr')} cosine "
           f"to 10%, AdamW (0.9, 0.95), weight decay 0.1, vocabulary {data.get('vocab_size')}. Every method trains "
           "the same shape on the same samples in the same order through `pretrain_alcot.py`'s `train()`; "
           "`vanilla, 2x layers` is the compute-matched reference with about twice the parameters."
           + alcot_loss_sentence(results.get("runs", {}).get("alcot3")), "",
           f"**Data**: {data.get('source', 'n/a')}; {data.get('documents', 0):,} documents, "
           f"{data.get('bytes', 0) / 1e6:.1f} MB. `--split {data.get('split')}`: training documents "
           f"{data.get('train_documents')}, validation documents {data.get('valid_documents')} (disjoint: no "
           "run trains on a validation document, and the SentencePiece tokenizer was trained on the training "
           f"documents only). Validation: {cfg.get('eval_iters')} batches of the validation split "
           "(the trainer's own evaluation), the same tokens for every method.", ""]
    if data.get("bytes_per_source"):
        out.append("Bytes per source: " + ", ".join(f"{k} {v / 1e6:.1f} MB"
                                                     for k, v in data["bytes_per_source"].items()) + ".")
        out.append("")
    if summary(results):
        out += ["## Summary (computed from the runs below)", ""] + summary(results) + [""]
    out += ["## Results", ""] + main_table(results.get("runs", {})) + [""]
    out += ["Training FLOPs come from the project's analytic counter applied to what each training "
            "micro-batch executed (`num_steps`); tokens seen = iterations × global batch × sequence length. "
            "Mean latent steps and depth shares are over the validation tokens. For loop/pause/PonderLM the "
            "latent-steps column is their fixed K.", ""]
    out += findings(results) + [""]
    if "ppl_vs_flops" in fig:
        out += [f"![perplexity vs training FLOPs]({fig['ppl_vs_flops']})", ""]
    if "depth" in fig:
        out += [f"![depth histograms]({fig['depth']})", ""]
    out += ["## Gap over training", ""] + gap_table(results.get("runs", {})) + [""]
    if "gap" in fig:
        out += [f"![validation perplexity during training]({fig['gap']})", ""]
    if results.get("sweep"):
        out += ["## λ / β sweep (ALCoT ℓmax=3)", "",
                "Larger λ should prune more (fewer latent steps) at some cost in quality; larger β should prune "
                "less. Same tokens and recipe as the table.", ""]
        out += sweep_table(results["sweep"], results.get("runs", {})) + [""]
        if "sweep" in fig:
            out += [f"![sweep]({fig['sweep']})", ""]
    if results.get("difficulty"):
        out += ["## Difficulty analysis", ""] + difficulty_section(results["difficulty"]) + [""]
        if "difficulty" in fig:
            out += [f"![latent steps vs difficulty]({fig['difficulty']})", ""]
    if results.get("investigate"):
        out += ["## What changes the ALCoT–vanilla gap: variants (`--investigate`)", "",
                "Each variant changes one thing; its reference is the vanilla model trained with the same "
                "recipe (same tokens, lr and length).", ""]
        out += investigate_table(results["investigate"], results.get("runs", {}),
                                 (results.get("difficulty") or {}).get("spearman_steps_vs_vanilla_loss")) + [""]
        out += investigate_findings(results["investigate"], results.get("runs", {})) + [""]
    if interpretation(results):
        out += ["## What the numbers suggest", ""] + interpretation(results) + [""]
    if results.get("notes"):
        out += ["## Notes", ""] + results["notes"] + [""]
    out += ["## Reproduce and scale", "",
            "```bash",
            "python bench/paper_table.py                          # the default preset: the table, sweep and analyses",
            "python bench/paper_table.py --investigate            # + the variants above",
            "python bench/paper_table.py --input corpus.jsonl --seed 7 --methods vanilla alcot3 --skip-sweep",
            "python bench/paper_table.py --corpus handbook --methods vanilla loop alcot3   # the second built-in corpus",
            "python bench/paper_table.py --preset 410m --input pile.jsonl --print-only   # torchrun commands, 8 GPUs",
            "python bench/paper_table.py --report-only            # redraw this page from results.json",
            "```", "",
            "`--preset 410m` / `--preset 1.4b` change only sizes, iterations (50k × 256 × 2048 = 26.2B tokens), "
            "batch, learning rate and bf16, and print each run as `torchrun --nproc-per-node 8 pretrain_alcot.py "
            "...`; the methods, sweep and analyses are the same code.", ""]
    out += ["## Run record", ""] + run_record(results) + [""]
    return "\n".join(out)
