#!/usr/bin/env bash
# One-GPU check (< 8 minutes on an H100/H200-class GPU): equivalence on CUDA, training MFU of a
# 1.4B-shaped LLaMA, ALCoT step time against the FLOPs ideal, peak memory -> docs/bench_gpu.md.
#
#   bench/gpu_check.sh                         # on a CUDA machine
#   bench/gpu_check.sh --smoke --output /tmp/bench_gpu.md    # tiny CPU run of every stage
#
# Installs nothing beyond the package registries: if this checkout's package is not importable,
# `pip install -e .` pulls its dependencies (torch etc.) from the configured index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch, megatron_alcot" 2>/dev/null; then
    "$PY" -m pip install -q -e .
fi
if [[ " $* " == *" --smoke "* ]]; then
    exec "$PY" bench/gpu_check.py "$@"
fi
exec timeout 470 "$PY" bench/gpu_check.py --compile "$@"
