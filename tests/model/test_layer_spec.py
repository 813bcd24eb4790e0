"""The layer spec (model/spec.py): the attention core and the GEMM library are chosen once, when the
model is built, and ``auto`` chooses as the per-call rule does."""
import types

import pytest
import torch

from megatron_alcot import hardware
from megatron_alcot.model import attention_backends, build_model, spec as spec_lib
from megatron_alcot.model.attention_backends import (FLEX_ON, UNFUSED_MAX_KEYS, AutoCore, FlexCore, SDPACore,
                                                     UnfusedCore, attention_core, resolve_backend)
from megatron_alcot.model.presets import preset
from megatron_alcot.parallel.tensor_parallel import gemm
from fake_machine import fake_machine as fake


def _per_call_rule(q, num_keys: int, lap_mask: bool) -> str:
    """``auto`` as it was resolved on every call before the spec: the reference."""
    if lap_mask and q.device.type in FLEX_ON:
        return "flex"
    if q.device.type != "cpu" or num_keys > UNFUSED_MAX_KEYS:
        return "sdpa"
    low_precision = q.dtype in (torch.bfloat16, torch.float16)
    return "unfused" if hardware.machine().unfused_faster(low_precision) else "sdpa"


@pytest.mark.parametrize("fp32, low", [(0.7, 2.5), (1.5, 1.05), (2.0, 2.0), (0.5, 0.5)])
def test_auto_core_chooses_as_the_per_call_rule(machine_is, fp32, low):
    machine_is(fake(unfused_speedup_fp32=fp32, unfused_speedup_bf16=low))
    core = attention_core("auto")
    assert isinstance(core, AutoCore)
    for device in ("cpu", "cuda", "meta"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            q = types.SimpleNamespace(device=torch.device(device), dtype=dtype)   # pick reads these only
            for keys in (1, UNFUSED_MAX_KEYS, UNFUSED_MAX_KEYS + 1, 4096):
                for lap_mask in (False, True):
                    expect = _per_call_rule(q, keys, lap_mask)
                    assert core.pick(q, keys, lap_mask).name == expect, (device, dtype, keys, lap_mask)
                    assert resolve_backend("auto", q, keys, lap_mask) == expect


def test_built_core_keeps_the_answers_it_was_built_with(machine_is):
    machine_is(fake(unfused_speedup_bf16=2.5))
    core = attention_core("auto")
    q16 = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    machine_is(fake(unfused_speedup_bf16=0.5))
    assert core.pick(q16, 8, False).name == "unfused"       # built with the first answers
    assert attention_core("auto").pick(q16, 8, False).name == "sdpa"


def test_fixed_backends_and_unknown_names():
    for name, cls in (("sdpa", SDPACore), ("unfused", UnfusedCore), ("flex", FlexCore)):
        core = attention_core(name)
        assert isinstance(core, cls) and core.name == name
        assert core.pick(torch.zeros(1, 1, 4, 8), 10 ** 6, True) is core
    with pytest.raises(ValueError, match="--attention-backend"):
        attention_core("flash3")
    with pytest.raises(ValueError, match="--cpu-gemm-backend"):
        gemm.gemm_library("blas")


@pytest.fixture
def counted_cores(monkeypatch):
    """Every core's calls counted by name; resolving a backend or reading the machine fails."""
    calls = []
    for cls in (SDPACore, UnfusedCore, FlexCore):
        real = cls.__call__

        def counted(self, *a, _real=real, **kw):
            calls.append(self.name)
            return _real(self, *a, **kw)
        monkeypatch.setattr(cls, "__call__", counted)

    def refuse(*a, **kw):
        raise AssertionError("a kernel was chosen while the model ran")

    real_library = gemm.gemm_library

    def arm():
        for owner, name in ((attention_backends, "attention_core"), (attention_backends, "resolve_backend"),
                            (AutoCore, "from_machine"), (gemm, "machine_support"), (hardware, "machine")):
            monkeypatch.setattr(owner, name, refuse)
        monkeypatch.setattr(gemm, "gemm_library",     # a library resolved at build passes through
                            lambda b: refuse() if isinstance(b, str) else real_library(b))
    return calls, arm


def _laps(model, dtype=None):
    """Forward and backward through three laps of ALCoT (fixed halting), then a no-grad forward."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 24), generator=g)
    labels = torch.randint(0, 256, (2, 24), generator=g)
    halting = lambda k, r, active: (torch.arange(24) % (k + 2) != 0).expand_as(active)  # noqa: E731
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(tokens, labels=labels, halting=halting)
        out.loss.backward()
        with torch.no_grad():
            model(tokens, halting=halting, return_logits=True)
    return out


def _model(**kw):
    return build_model(preset("tiny", latent_method="alcot", latent_max_steps=2,
                              untie_embeddings_and_output_weights=True, **kw))


@pytest.mark.parametrize("backend", ["sdpa", "unfused", "flex"])
def test_model_calls_only_its_core_across_laps(counted_cores, backend):
    calls, arm = counted_cores
    model = _model(attention_backend=backend, cpu_gemm_backend="torch")
    layers = len(model.decoder.layers)
    assert all(layer.self_attention.core_attention is model.spec.core_attention
               for layer in model.decoder.layers.values())
    arm()
    out = _laps(model)
    laps = int((out.lap_active > 0).sum())
    assert laps == 3 and set(calls) == {backend}
    assert len(calls) == 2 * layers * laps          # the forward with gradients, then the one without


@pytest.mark.parametrize("dtype, expect", [(None, "sdpa"), (torch.bfloat16, "unfused")])
def test_auto_model_runs_the_core_of_its_precision(counted_cores, machine_is, dtype, expect):
    """A fake machine where unfused beats SDPA in bf16 only: every lap's core follows the
    precision of the call, and nothing is resolved while the laps run."""
    calls, arm = counted_cores
    machine_is(fake(unfused_speedup_bf16=2.5, unfused_speedup_fp32=0.7, onednn_speedup=0.5))
    model = _model(attention_backend="auto", cpu_gemm_backend="auto")
    assert model.spec.gemm.name == "torch"
    assert "auto (CPU up to 256 keys: sdpa in fp32, unfused in bf16/fp16" in model.spec.describe()
    arm()
    _laps(model, dtype)
    assert calls and set(calls) == {expect}


@pytest.mark.skipif(not gemm.onednn_available(), reason="torch built without oneDNN")
def test_gemm_library_chosen_at_build(machine_is):
    machine_is(fake(onednn_speedup=2.0))
    model = _model(cpu_gemm_backend="auto")
    libs = {m.gemm.name for m in model.modules() if hasattr(m, "gemm")}
    assert model.spec.gemm.name == "onednn" and libs == {"onednn"}
    machine_is(fake(onednn_speedup=0.5))
    assert gemm.gemm_library("auto").name == "torch" and model.spec.gemm.name == "onednn"
    assert spec_lib.build_layer_spec(preset("tiny", cpu_gemm_backend="torch")).gemm.name == "torch"


def _per_call_gemm_rule(backend: str, x, weight) -> str:
    """``--cpu-gemm-backend`` as it was resolved on every call before the spec: the reference."""
    if backend == "torch":
        return "torch"
    plain_fp32_cpu = (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
                      and not torch.is_autocast_enabled("cpu"))
    if not plain_fp32_cpu:
        return "torch"
    usable, auto = gemm.machine_support()
    return "onednn" if (usable if backend == "onednn" else auto) else "torch"


@pytest.mark.parametrize("speedup", [2.0, 0.5])
def test_gemm_library_chooses_as_the_per_call_rule(machine_is, speedup):
    machine_is(fake(onednn_speedup=speedup))
    w = torch.ones(3, 8)
    calls = [(torch.ones(4, 8), w, False), (torch.ones(4, 8), w, True), (torch.ones(4, 8).double(), w.double(), False),
             (torch.ones(4, 8).bfloat16(), w.bfloat16(), False), (torch.ones(4, 8, device="meta"), w.to("meta"), False)]
    for backend in ("auto", "torch", "onednn"):
        lib = gemm.gemm_library(backend)
        assert gemm.gemm_library(lib) is lib
        for x, weight, autocast in calls:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                assert lib.for_call(x, weight) == _per_call_gemm_rule(backend, x, weight), (backend, x.dtype, autocast)
