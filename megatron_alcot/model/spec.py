"""The kernels a model's layers run, chosen once when the model is built.

    spec = build_layer_spec(cfg)           # reads --attention-backend, --cpu-gemm-backend, the machine
    spec.core_attention(q, keys, values, mask, dropout_p)    # what SelfAttention calls every lap
    spec.gemm.linear(x, weight)            # the library of plain fp32 CPU GEMMs (LM head)
    print(spec.describe())                 # attention auto (...), GEMM onednn

``LlamaModel`` builds one spec and hands it to every layer, so no layer reads a backend name while
it runs. What still depends on the call lives inside the chosen object, as a rule on the call's
tensors: ``auto`` attention looks at the queries' device and precision, the key count and the mask
kind (``attention_backends.AutoCore``); the GEMM library applies to plain fp32 CPU calls only,
autocast and other dtypes run torch's (``gemm.GemmLibrary``). The measured answers ``auto`` needs
are read from :func:`megatron_alcot.hardware.machine` here, so a model keeps the kernels it was
built with; training shares rank 0's answers before building (``hardware.share_from_rank0``).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_alcot.model.attention_backends import UNFUSED_MAX_KEYS, AttentionCore, AutoCore, attention_core
from megatron_alcot.parallel.tensor_parallel.gemm import GemmLibrary, gemm_library


@dataclass(frozen=True)
class LayerSpec:
    """The resolved kernels of one model's layers."""

    core_attention: AttentionCore       # called as core(q, keys, values, mask, dropout_p)
    gemm: GemmLibrary                   # the linears' and LM head's fp32 CPU GEMM library

    def describe(self) -> str:
        core = self.core_attention
        if isinstance(core, AutoCore):
            fp32 = "unfused" if core.unfused_fp32 else "sdpa"
            low = "unfused" if core.unfused_low else "sdpa"
            attention = (f"auto (CPU up to {UNFUSED_MAX_KEYS} keys: {fp32} in fp32, {low} in bf16/fp16, "
                         f"else sdpa; CUDA: flex for lap masks, else sdpa)")
        else:
            attention = core.name
        return f"attention {attention}, fp32 CPU GEMMs in {self.gemm.name}"


def build_layer_spec(cfg) -> LayerSpec:
    """``cfg`` (a ModelConfig) -> the kernels its layers run on this machine."""
    return LayerSpec(core_attention=attention_core(cfg.attention_backend),
                     gemm=gemm_library(cfg.cpu_gemm_backend))


__all__ = ["LayerSpec", "build_layer_spec"]
