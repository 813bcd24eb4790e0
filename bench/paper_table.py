"""The paper's comparison in miniature: every method on the same tokens, the λ/β sweep, the
difficulty analysis and the gap over training, written to docs/paper_table.md with PNG plots.

    python bench/paper_table.py                                   # default preset "cpu" (≤ 1 h on 2 cores)
    python bench/paper_table.py --investigate                     # + the why-not-better variants
    python bench/paper_table.py --methods vanilla alcot3 --skip-sweep --iters 200
    python bench/paper_table.py --input my_corpus.jsonl --seed 7 --output-dir out --docs-dir out/docs
    python bench/paper_table.py --corpus handbook --methods vanilla loop alcot3   # a second built-in corpus
    python bench/paper_table.py --preset 410m --input pile.jsonl --print-only   # torchrun commands

Stages: corpus (Debian text packages -> JSONL, unless ``--input``), tokenizer + ``.bin/.idx``
(tokenizer trained on the training documents of ``--split`` only), the training runs (in-process
``megatron_alcot.training.train.train`` with Megatron flags, the code path of ``pretrain_alcot.py``),
the analyses and the report. The GPU presets (410m, 1.4b) print each run as the equivalent
``torchrun --nproc-per-node 8 pretrain_alcot.py ...`` command; without ``--print-only`` they then
also train in-process on this machine's one device. Run records are cached under ``--output-dir/runs``; rerunning reuses
every run whose flags did not change (``--force`` retrains).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.paper import analysis, plots, report  # noqa: E402
from bench.paper.corpus import build_debian_corpus, count_documents, prepare_data  # noqa: E402
from bench.paper.presets import (ALCOT_BETA, ALCOT_LAMBDA, DEFAULT_INVESTIGATIONS,  # noqa: E402
                                 INVESTIGATIONS, METHODS, PRESETS, flag_value, method_argv, sweep_method,
                                 with_iters)
from bench.paper.runs import load_tokens, run_training  # noqa: E402

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default=None,
                   help="runs and data (default bench_out/paper; bench_out/paper_handbook for --corpus handbook; "
                        "bench_out/paper_NAME for --input NAME.jsonl)")
    p.add_argument("--docs-dir", default=None,
                   help="where paper_table.md and paper_*.png go (default docs/; docs/paper_table_handbook/ for "
                        "--corpus handbook; OUTPUT_DIR/docs for --input)")
    p.add_argument("--input", default=None, help="any JSONL corpus ({'text': ...} per line) instead of "
                                                 "the Debian one")
    p.add_argument("--corpus", default="debian", choices=["debian", "handbook"],
                   help="the built-in corpus when no --input: Debian text packages (67 MB) or the Debian "
                        "handbook, fortunes and the Jargon File (5 MB, no package in common)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="training precision; auto: the preset's bf16 on GPUs, and on CPUs only where a bf16 "
                        "matmul measured faster than fp32 (megatron_alcot.hardware), else fp32")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--investigate", nargs="*", default=None, metavar="VARIANT",
                   help="also run the why-not-better variants (no names: "
                        f"{', '.join(DEFAULT_INVESTIGATIONS)}; also: inv_vanilla_2xiters inv_alcot_2xiters)")
    p.add_argument("--iters", type=int, default=0, help="override the preset's training iterations")
    p.add_argument("--split", default="98,2,0")
    p.add_argument("--vocab-size", type=int, default=0, help="override the preset's vocabulary")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per run (fixed: results depend on it, not on --jobs)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained side by side in worker processes")
    p.add_argument("--print-only", action="store_true", help="print the torchrun commands and stop")
    p.add_argument("--force", action="store_true", help="retrain runs whose records exist")
    p.add_argument("--verify-determinism", nargs="*", default=[], metavar="RUN",
                   help="train these runs a second time from scratch and report whether every number matches")
    p.add_argument("--report-only", action="store_true",
                   help="redraw the report from --output-dir/results.json without training")
    return p


def _machine() -> dict:
    import torch
    model = platform.processor() or "n/a"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    from megatron_alcot import hardware
    return {"cores": os.cpu_count(), "cpu_model": model, "torch": torch.__version__,
            "cpu_isa": " ".join(hardware.machine().isa),
            "load_average_start": " / ".join(f"{x:.1f}" for x in load) if load else None}


def resolve_bf16(precision: str, spec) -> bool:
    """Whether the runs train under bf16 autocast; ``auto`` logs its reason on one line."""
    if precision != "auto":
        return precision == "bf16"
    if spec.gpus or not spec.bf16:
        return spec.bf16
    from megatron_alcot import hardware
    decision = hardware.precision_choice("cpu")
    hardware.log_choice("--precision", decision, print)
    return decision.choice == "bf16"


def _torchrun(spec, argv) -> str:
    launcher = f"torchrun --nproc-per-node {spec.gpus}" if spec.gpus else "python"
    return f"{launcher} pretrain_alcot.py " + " ".join(shlex.quote(a) for a in argv)


def _plan(opts, spec, data, out):
    """[(group, name, label, argv, extra record fields)] of every run to do, in order."""
    plan = []
    for name in opts.methods:
        m = METHODS[name]
        plan.append(("runs", name, m.label, method_argv(spec, m, data, opts.seed, spec.iters, out), {}))
    if not opts.skip_sweep and "alcot3" in opts.methods:
        for lam, beta in spec.sweep:
            if (lam, beta) == (ALCOT_LAMBDA, ALCOT_BETA):
                continue           # the table's own ALCoT ℓmax=3 run is this point
            m = sweep_method(lam, beta)
            plan.append(("sweep", m.name, m.label, method_argv(spec, m, data, opts.seed, spec.iters, out),
                         {"lambda": lam, "beta": beta}))
    if opts.investigate is not None:
        chosen = set(opts.investigate or DEFAULT_INVESTIGATIONS)
        for v in (v for v in INVESTIGATIONS if v.name in chosen):
            iters = int(round(spec.iters * v.iters_factor))
            scale = f"{math.sqrt(2.5 * spec.hidden_size):.6g}"
            flags = tuple(f.replace("{embed_scale}", scale) for f in v.flags)
            argv = method_argv(spec, METHODS[v.method], data, opts.seed, iters, out, lr=v.lr, extra=flags)
            ref = v.reference
            plan.append(("investigate", v.name, v.label, argv, {"reference": ref}))
    return plan


def _init_worker(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _one_run(item, runs_dir, force):
    group, name, label, run_argv, extra = item
    rec = run_training(name, run_argv, runs_dir, label=label, force=force)
    rec.update(extra)
    return group, name, rec


def _cost(item) -> float:
    """Rough relative cost, so the longest runs start first when several run side by side."""
    argv = item[3]
    steps = 0 if flag_value(argv, "--latent-method", "vanilla") == "vanilla" else \
        int(flag_value(argv, "--latent-max-steps", "3"))
    return int(flag_value(argv, "--num-layers", "1")) * (1 + steps) * int(flag_value(argv, "--train-iters", "1"))


def _train_all(plan, runs_dir, opts, start):
    """Yield ``(group, name, record)`` as runs finish; ``--jobs`` worker processes when > 1."""
    groups = ("runs", "sweep", "investigate")
    todo = sorted(plan, key=lambda it: (groups.index(it[0]), -_cost(it))) if opts.jobs > 1 else plan
    if opts.jobs <= 1:
        for item in todo:
            print(f"== {item[0]}/{item[1]}: {item[2]} ({time.time() - start:.0f} s elapsed)", flush=True)
            yield _report_run(_one_run(item, runs_dir, opts.force), start)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(opts.jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(opts.threads,)) as pool:
        futures = [pool.submit(_one_run, item, runs_dir, opts.force) for item in todo]
        print(f"== {len(todo)} runs on {opts.jobs} workers × {opts.threads} threads", flush=True)
        for fut in as_completed(futures):
            yield _report_run(fut.result(), start)


def _report_run(result, start):
    group, name, rec = result
    if rec.get("failed"):
        print(f"   {group}/{name}: FAILED: {rec['failed']}", flush=True)
        return result
    print(f"   {group}/{name}: valid ppl {rec['valid_ppl']:.3f}, mean latent steps "
          f"{rec['valid_mean_latent_steps']:.3f}, {rec['train_flops']:.3e} FLOPs, {rec['seconds']:.0f} s "
          f"({time.time() - start:.0f} s elapsed)", flush=True)
    return result


def _verify(plan, names, results, runs_dir) -> dict:
    """Train ``names`` a second time from scratch into ``runs_dir``_verify (a record already there with the
    same flags is such a second run) and compare every recorded number."""
    out = {}
    keys = ("valid_lm_loss", "valid_ppl", "train_flops", "train_lm_loss", "evals", "valid_mean_latent_steps")
    for group, name, label, run_argv, _ in plan:
        if name not in names:
            continue
        print(f"== determinism: training {name} again", flush=True)
        again = run_training(name, run_argv, runs_dir + "_verify", label=label)
        first = results[group][name]
        out[name] = {"identical": all(first.get(k) == again.get(k) for k in keys),
                     "valid_ppl": [first["valid_ppl"], again["valid_ppl"]], "seconds": again["seconds"]}
    return out


def _group_wall_seconds(results, runs_dir) -> dict:
    """Wall time of each group of runs, first start to last finish (records written before
    ``finished_at`` existed fall back to their file's modification time)."""
    out, everything = {}, []
    for group in ("runs", "sweep", "investigate"):
        spans = []
        for name, rec in results.get(group, {}).items():
            if group != "runs" and name in results.get("runs", {}):
                continue                     # the sweep's default point is the table's own run
            end = rec.get("finished_at")
            if end is None:
                path = os.path.join(runs_dir, f"{rec.get('name', name)}.json")
                if not os.path.exists(path):
                    continue
                end = os.path.getmtime(path)
            spans.append((end - rec["seconds"], end))
        everything += spans
        if spans:
            out[group] = spans
    if everything:
        out["all"] = everything
    return {k: {"seconds": max(e for _, e in v) - min(s for s, _ in v), "runs": len(v)} for k, v in out.items()}


def _difficulty(results, runs_dir):
    """The full analysis of the table's ALCoT ℓmax=3 run; also ρ for every sweep point and every
    ALCoT variant against the vanilla run of the same recipe (stored as ``spearman_vs_vanilla``)."""
    runs = results["runs"]
    if "alcot3" not in runs or "vanilla" not in runs:
        return None
    vanilla = {"vanilla": load_tokens(runs_dir, "vanilla")}
    refs = {v.name: v.reference for v in INVESTIGATIONS}
    for group in ("sweep", "investigate"):
        for name, rec in results[group].items():
            ref = refs.get(name, "vanilla")
            if not rec.get("valid_mean_latent_steps") or rec.get("method") != "alcot":
                continue
            if ref not in vanilla:
                if not os.path.exists(os.path.join(runs_dir, f"{ref}_tokens.npz")):
                    continue
                vanilla[ref] = load_tokens(runs_dir, ref)
            try:
                d = analysis.difficulty_analysis(load_tokens(runs_dir, name), vanilla[ref])
            except ValueError:      # validation passes of different lengths: not comparable
                continue
            rec["spearman_vs_vanilla"] = d["spearman_steps_vs_vanilla_loss"]
    return analysis.difficulty_analysis(load_tokens(runs_dir, "alcot3"), vanilla["vanilla"])


def _write_report(results, opts):
    figures = plots.draw_all(results, opts.docs_dir)
    text = report.render(results, figures)
    path = os.path.join(opts.docs_dir, "paper_table.md")
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
    os.replace(path + ".tmp", path)
    return path


def _save_results(results, out):
    path = os.path.join(out, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def _prepare(opts, spec, out, stage_seconds) -> dict:
    t = time.time()
    if opts.input:
        jsonl, source = os.path.abspath(opts.input), f"`{opts.input}` (given with --input)"
        corpus = {"documents": count_documents(jsonl), "bytes": os.path.getsize(jsonl)}
    else:
        jsonl = os.path.join(out, "corpus.jsonl")
        what = ("King James Bible, GCIDE dictionary (capped), Linux kernel docs, Python 3.11 docs, Perl pods"
                if opts.corpus == "debian" else
                "the Debian Administrator's Handbook (English), the fortune files, the Jargon File")
        source = (f"English text from Debian packages: {what}; paragraphs grouped into ~2 KB documents, "
                  f"shuffled with seed {opts.seed}")
        stats_path = jsonl + ".stats.json"
        if not (os.path.exists(jsonl) and os.path.exists(stats_path)):
            print(f"== corpus: building `{opts.corpus}` from Debian text packages", flush=True)
            with open(stats_path, "w") as f:
                json.dump(build_debian_corpus(jsonl, seed=opts.seed, corpus=opts.corpus), f)
        with open(stats_path) as f:
            corpus = json.load(f)
    stage_seconds["corpus"] = time.time() - t
    t = time.time()
    print("== tokenizer and .bin/.idx", flush=True)
    data = prepare_data(out, jsonl, opts.split, spec.vocab_size, seed=opts.seed)
    data.update(source=source, **{k: v for k, v in corpus.items() if k != "documents"})
    stage_seconds["data"] = time.time() - t
    return data


def resolve_dirs(opts) -> None:
    """Fill ``opts.output_dir``/``opts.docs_dir`` left unset. Each corpus gets its own runs and data,
    so no run or .idx of one corpus is ever reused for another."""
    if opts.input:
        stem = os.path.splitext(os.path.basename(opts.input))[0]
        opts.output_dir = opts.output_dir or os.path.join(ROOT, "bench_out", f"paper_{stem}")
        opts.docs_dir = opts.docs_dir or os.path.join(opts.output_dir, "docs")
    elif opts.corpus != "debian":
        opts.output_dir = opts.output_dir or os.path.join(ROOT, "bench_out", f"paper_{opts.corpus}")
        opts.docs_dir = opts.docs_dir or os.path.join(ROOT, "docs", f"paper_table_{opts.corpus}")
    opts.output_dir = opts.output_dir or os.path.join(ROOT, "bench_out", "paper")
    opts.docs_dir = opts.docs_dir or os.path.join(ROOT, "docs")


def main(argv=None) -> int:
    opts = build_parser().parse_args(argv)
    resolve_dirs(opts)
    if opts.report_only:
        with open(os.path.join(opts.output_dir, "results.json")) as f:
            results = json.load(f)
        runs_dir = os.path.join(opts.output_dir, "runs")
        if results.get("difficulty") is None:
            results["difficulty"] = _difficulty(results, runs_dir)
        results["meta"].setdefault("group_wall_seconds", _group_wall_seconds(results, runs_dir))
        print(f"== report -> {_write_report(results, opts)}")
        return 0
    import torch
    torch.set_num_threads(opts.threads)
    spec = with_iters(PRESETS[opts.preset], opts.iters)
    from dataclasses import replace
    if opts.vocab_size:
        spec = replace(spec, vocab_size=opts.vocab_size)
    spec = replace(spec, bf16=resolve_bf16(opts.precision, spec))
    out = os.path.abspath(opts.output_dir)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    stage_seconds = {}
    meta = {"command": "python bench/paper_table.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "preset": spec.name, "preset_description": spec.description, "seed": opts.seed,
            "threads": opts.threads, "jobs": opts.jobs, "bf16": spec.bf16, "config": dict(spec.__dict__), **_machine()}
    meta["config"]["sweep"] = [list(x) for x in spec.sweep]

    if opts.print_only:
        prefix = os.path.join(out, "data", f"corpus_v{spec.vocab_size}_s{opts.split.replace(',', '-')}")
        data = {"data_prefix": prefix + "_text_document", "split": opts.split,
                "tokenizer_model": prefix.replace("corpus_", "tokenizer_") + ".model"}
    else:
        data = _prepare(opts, spec, out, stage_seconds)
    plan = _plan(opts, spec, data, out)
    if opts.print_only or spec.gpus:
        print(f"== the {spec.name} recipe as launcher commands ({len(plan)} runs):")
        for group, name, label, run_argv, _ in plan:
            print(f"# {group}/{name}: {label}\n{_torchrun(spec, run_argv)}")
        if opts.print_only:
            return 0

    results = {"meta": meta, "data": data, "runs": {}, "sweep": {}, "investigate": {}}
    runs_dir = os.path.join(out, "runs")
    t = time.time()
    for group, name, rec in _train_all(plan, runs_dir, opts, start):
        results[group][name] = rec
        _save_results(results, out)
    for group in ("runs", "sweep", "investigate"):   # plan order, whatever order the runs finished in
        results[group] = {name: results[group][name] for g, name, *_ in plan if g == group}
    stage_seconds["training"] = time.time() - t
    if results["sweep"] and "alcot3" in results["runs"]:
        base = dict(results["runs"]["alcot3"], **{"lambda": ALCOT_LAMBDA, "beta": ALCOT_BETA})
        results["sweep"] = {"alcot3": base, **results["sweep"]}
    results["difficulty"] = _difficulty(results, runs_dir)
    results["determinism"] = _verify(plan, opts.verify_determinism, results, runs_dir)
    meta["group_wall_seconds"] = _group_wall_seconds(results, runs_dir)
    meta["stage_seconds"] = stage_seconds
    meta["total_seconds"] = time.time() - start
    _save_results(results, out)
    path = _write_report(results, opts)
    print(f"== report -> {path} ({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
