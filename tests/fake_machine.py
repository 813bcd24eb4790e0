"""A :class:`megatron_alcot.hardware.Machine` with chosen speed ratios, for tests of ``auto`` choices.

    m = fake_machine(unfused_speedup_bf16=2.5)   # every ratio not named is 1.0 (no gain)
"""
import torch

from megatron_alcot.hardware import Machine


def fake_machine(**ratios) -> Machine:
    base = dict(cpu="Test CPU 9000", isa=["avx2"], torch_version=torch.__version__, bf16_speedup=1.0,
                fp16_speedup=1.0, onednn_speedup=1.0, unfused_speedup_fp32=1.0, unfused_speedup_bf16=1.0)
    base.update(ratios)
    return Machine(**base)
