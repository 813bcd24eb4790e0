"""``--torch-compile``: compile each transformer layer with ``torch.compile`` (inductor).

    compiled = apply_torch_compile(model)     # number of layers compiled

Layers are compiled in place (``nn.Module.compile``), so parameter names, checkpoints and the HF
export do not change. Each layer is one graph: its norms, rotary embedding, SwiGLU and residual
adds fuse into a few kernels around the matmuls and attention. The first step pays the
compilation (seconds to a minute on CPU); with latent steps the compacted row count varies from
lap to lap, so a layer recompiles once and then treats that dimension as dynamic.
With activation recomputation (applied first, ``recompute.py``) the compiled layer's graph holds
the non-reentrant checkpoint, so the recomputation runs the compiled code too. Under tensor
parallelism the layer's all-gathers / reduce-scatters (autograd functions around
``torch.distributed`` calls) split it into a few graphs. Both train the eager curve
(tests/training/test_compile_combinations.py).
"""
from __future__ import annotations

import torch

from megatron_alcot.training.recompute import find_layers


def apply_torch_compile(model: torch.nn.Module) -> int:
    layers = find_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


__all__ = ["apply_torch_compile"]
