#!/usr/bin/env bash
# The README's main job on CPU: corpus -> tokenizer -> .bin/.idx -> tiny ALCoT and vanilla models.
# Output: quickstart_out/{results.json,loss_curves.png,...}. About 4 minutes on 2 idle cores (much longer if other jobs share the cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" -m megatron_alcot.quickstart --output-dir "${OUTPUT_DIR:-quickstart_out}" "$@"
