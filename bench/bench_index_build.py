#!/usr/bin/env python3
"""Index build time and peak memory: our numpy GPTDataset/blend indices vs Megatron's C++ helper.

    python bench/bench_index_build.py [--docs 10000000] [--seq-length 2048] [--out docs/bench_index_build.md]

A synthetic dataset of 10M documents (lengths uniform in [1, 980], ~4.9G tokens, ~2.4M samples of
2048 tokens; only the lengths matter for index building, so no .bin is written). Each measurement
runs in its own process, side by side in one run; peak RSS is the process high-water mark during the
build (reset with /proc/self/clear_refs) and the increase over the RSS before it. Megatron's side
is megatron-core's compiled ``helpers_cpp`` with the same numpy shuffles, skipped when not installed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(kind: str, docs: int, seq: int, seed: int) -> dict:
    import numpy
    sys.path.insert(0, ROOT)
    from megatron_alcot.data import gpt_dataset as G
    from megatron_alcot.data.blended_dataset import build_blending_indices
    if kind.startswith("megatron"):
        import warnings
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers_cpp
    sizes = numpy.random.RandomState(0).randint(1, 981, size=docs).astype(numpy.int32)
    documents = numpy.arange(docs, dtype=numpy.int32)
    tokens = int(sizes.sum(dtype=numpy.int64))
    num_samples = (tokens - 1) // seq
    weights = [0.3, 0.7] if kind.endswith("blend2") else [0.1, 0.15, 0.2, 0.25, 0.3]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss_before = _status("VmRSS")
    t0 = time.perf_counter()
    if kind == "ours":
        G.build_gpt_indices(sizes, documents, num_samples, seq, seed)
    elif kind == "megatron":
        rng = numpy.random.RandomState(seed)
        doc_index = G.build_document_index(documents, 1, rng, False)
        sample_index = helpers_cpp.build_sample_idx_int32(sizes, doc_index, seq, 1, tokens, True, 1)
        G.build_shuffle_index(sample_index.shape[0] - 1, sample_index.shape[0] - 1, rng)
    elif kind == "ours_sample_index_only" or kind == "megatron_sample_index_only":
        doc_index = G.build_document_index(documents, 1, numpy.random.RandomState(seed), False)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss_before = _status("VmRSS")
        t0 = time.perf_counter()
        if kind.startswith("ours"):
            G.build_sample_index(sizes, doc_index, seq, 1, tokens)
        else:
            helpers_cpp.build_sample_idx_int32(sizes, doc_index, seq, 1, tokens, True, 1)
    elif kind.startswith("ours_blend"):
        build_blending_indices(weights, num_samples)
    elif kind.startswith("megatron_blend"):
        di = numpy.zeros(num_samples, numpy.int16)
        si = numpy.zeros(num_samples, numpy.int64)
        helpers_cpp.build_blending_indices(di, si, numpy.asarray(weights), len(weights), num_samples, False)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"kind": kind, "seconds": seconds, "peak_rss_gb": peak / 2 ** 30,
            "increase_gb": (peak - rss_before) / 2 ** 30, "num_samples": num_samples, "tokens": tokens}


def run(kind: str, a) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--docs", str(a.docs),
                          "--seq-length", str(a.seq_length)], capture_output=True, text=True)
    if out.returncode:
        return {"kind": kind, "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=10_000_000)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--child", default=None)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "bench_index_build.md"))
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.docs, a.seq_length, 1234)))
        return
    try:
        import megatron.core  # noqa: F401
        have = True
    except ImportError:
        have = False
    pairs = [("ours", "megatron"), ("ours_sample_index_only", "megatron_sample_index_only"),
             ("ours_blend2", "megatron_blend2"), ("ours_blend5", "megatron_blend5")]
    rows = []
    for ours, theirs in pairs:
        r_ours = run(ours, a)
        r_theirs = run(theirs, a) if have else {"kind": theirs, "error": "megatron-core not installed"}
        rows.append((r_ours, r_theirs))
        print(json.dumps(r_ours)); print(json.dumps(r_theirs))
    n = rows[0][0].get("num_samples")
    lines = [f"# Index build: numpy vs Megatron's C++ helper\n",
             f"`python bench/bench_index_build.py --docs {a.docs} --seq-length {a.seq_length}` on "
             f"{os.cpu_count()} cores: {a.docs:,} documents, {rows[0][0].get('tokens', 0):,} tokens, "
             f"{n:,} samples of {a.seq_length} tokens. Each row is a fresh process; peak RSS is the "
             "high-water mark during the build, 'increase' is above the RSS just before it "
             "(the lengths array, interpreter and imports are in the baseline).\n",
             "| what | ours (s) | Megatron C++ (s) | ratio ours/C++ | ours peak RSS / increase (GB) | "
             "Megatron peak RSS / increase (GB) |", "|---|---|---|---|---|---|"]
    for r_o, r_t in rows:
        what = r_o["kind"].replace("ours_", "").replace("ours", "full GPT indices (doc+sample+shuffle)")
        if "error" in r_t:
            lines.append(f"| {what} | {r_o['seconds']:.3f} | n/a ({r_t['error']}) | | "
                         f"{r_o['peak_rss_gb']:.2f} / {r_o['increase_gb']:.2f} | |")
        else:
            lines.append(f"| {what} | {r_o['seconds']:.3f} | {r_t['seconds']:.3f} | "
                         f"{r_o['seconds'] / r_t['seconds']:.2f} | {r_o['peak_rss_gb']:.2f} / "
                         f"{r_o['increase_gb']:.2f} | {r_t['peak_rss_gb']:.2f} / {r_t['increase_gb']:.2f} |")
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
