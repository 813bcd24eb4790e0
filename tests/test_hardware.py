"""megatron_alcot.hardware: every ``auto`` follows the measurement (faked here), the cache, the
override and the slow-bf16 warning."""
import dataclasses
import json
import math
import os

import pytest
import torch

from megatron_alcot import hardware
from megatron_alcot.hardware import MARGIN, ProbeOverrideError
from megatron_alcot.model.attention_backends import UNFUSED_MAX_KEYS, resolve_backend
from megatron_alcot.parallel.tensor_parallel import gemm
from fake_machine import fake_machine as fake
from dist_utils import run_distributed


@pytest.fixture
def counting_probe(monkeypatch, tmp_path):
    """``measure`` replaced by a fake that counts its calls; the cache in a fresh folder."""
    monkeypatch.setenv(hardware.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(hardware.ENV, raising=False)
    calls = []

    def measure():
        calls.append(1)
        return fake(bf16_speedup=0.25, onednn_speedup=1.6 + len(calls))
    monkeypatch.setattr(hardware, "measure", measure)
    return calls


@pytest.mark.parametrize("speedup, choice", [(3.0, "bf16"), (MARGIN, "bf16"), (1.1, "fp32"), (0.02, "fp32")])
def test_precision_auto_is_bf16_only_where_measured_fast(machine_is, speedup, choice):
    machine_is(fake(bf16_speedup=speedup))
    d = hardware.precision_choice("cpu")
    assert d.choice == choice
    assert f"bf16 matmul {speedup:.2f}x fp32's speed" in d.reason and "Test CPU 9000" in d.reason


@pytest.mark.skipif(not gemm.onednn_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("speedup, choice", [(2.0, "onednn"), (1.1, "torch"), (0.6, "torch")])
def test_gemm_auto_follows_the_measured_library(machine_is, speedup, choice):
    machine_is(fake(onednn_speedup=speedup))
    x, w = torch.ones(4, 8), torch.ones(3, 8)
    assert gemm.resolve_gemm_backend("auto", x, w) == choice
    assert gemm.auto_prefers_onednn() == (choice == "onednn")
    assert gemm.resolve_gemm_backend("torch", x, w) == "torch"          # explicit flags are untouched
    assert gemm.resolve_gemm_backend("onednn", x, w) == "onednn"
    with torch.autocast("cpu", dtype=torch.bfloat16):                    # autocast: oneDNN's bf16 anyway
        assert gemm.resolve_gemm_backend("auto", x, w) == "torch"
    assert hardware.gemm_choice().line("--cpu-gemm-backend").startswith(f"--cpu-gemm-backend auto -> {choice}: ")


def test_attention_auto_follows_the_measured_core(machine_is):
    q32 = torch.zeros(1, 1, 4, 8)
    q16 = q32.bfloat16()
    machine_is(fake(unfused_speedup_bf16=2.5, unfused_speedup_fp32=0.7))
    assert resolve_backend("auto", q16, UNFUSED_MAX_KEYS) == "unfused"
    assert resolve_backend("auto", q16, UNFUSED_MAX_KEYS + 1) == "sdpa"     # O(m·M) scores: capped
    assert resolve_backend("auto", q32, 128) == "sdpa"
    assert resolve_backend("sdpa", q16, 8) == "sdpa" and resolve_backend("unfused", q32, 10 ** 6) == "unfused"
    machine_is(fake(unfused_speedup_bf16=1.05, unfused_speedup_fp32=1.5))
    assert resolve_backend("auto", q16, 128) == "sdpa"
    assert resolve_backend("auto", q32, 128) == "unfused"
    assert hardware.attention_choice(torch.float32).choice == "unfused"


def test_forced_answers_win_and_say_so(counting_probe):
    m = hardware.load("bf16=fast,gemm=torch,attention=unfused")
    assert m.forced == {"bf16": "fast", "gemm": "torch", "attention": "unfused"}
    hardware.set_machine(m)
    try:
        d = hardware.precision_choice("cpu")
        assert d.choice == "bf16"                           # measured 0.25x, forced fast
        assert "forced by MEGATRON_ALCOT_PROBE bf16=fast (measured bf16 matmul 0.25x" in d.reason
        assert hardware.gemm_choice().choice == "torch"     # measured 2.6x, forced torch
        assert resolve_backend("auto", torch.zeros(1, 1, 4, 8), 64) == "unfused"
    finally:
        hardware.set_machine(None)


def test_cache_is_written_read_and_invalidated_by_torch_version(counting_probe, monkeypatch, tmp_path):
    first = hardware.load("")
    assert len(counting_probe) == 1 and first.source == "measured"
    path = hardware.cache_path()
    assert os.path.dirname(path) == str(tmp_path)
    with open(path) as f:
        stored = json.load(f)
    assert stored["identity"]["torch"] == torch.__version__ and stored["machine"]["onednn_speedup"] == 2.6
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []     # no temporary left behind

    again = hardware.load("")
    assert len(counting_probe) == 1 and again.source == f"cache {path}" and again.onednn_speedup == 2.6

    monkeypatch.setattr(torch, "__version__", "9.9.9")
    upgraded = hardware.load("")
    assert len(counting_probe) == 2 and upgraded.onednn_speedup == 3.6 and hardware.cache_path() != path

    other_isa = "SSE41" if os.environ.get("ONEDNN_MAX_CPU_ISA") == "AVX2" else "AVX2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", other_isa)        # an ISA-limited run is another machine
    hardware.load("")
    assert len(counting_probe) == 3


def test_remeasure_nocache_and_a_damaged_cache(counting_probe):
    hardware.load("")
    path = hardware.cache_path()
    assert hardware.load("remeasure").onednn_speedup == 3.6 and len(counting_probe) == 2
    assert hardware.load("").onednn_speedup == 3.6                         # remeasure rewrote the file
    os.remove(path)
    hardware.load("nocache")
    assert len(counting_probe) == 3 and not os.path.exists(path)
    with open(path, "w") as f:
        f.write("{not json")
    assert hardware.load("").source == "measured" and len(counting_probe) == 4
    assert hardware.load("").source == f"cache {path}" and len(counting_probe) == 4   # repaired


def test_an_answer_timed_under_load_is_retimed_when_quiet(counting_probe, monkeypatch):
    def measure():
        counting_probe.append(1)
        return dataclasses.replace(fake(), load=4.0 if len(counting_probe) == 1 else 0.2)
    monkeypatch.setattr(hardware, "measure", measure)
    monkeypatch.setattr(hardware, "_load_per_core", lambda: 3.0)
    assert hardware.load("").load == 4.0
    assert hardware.load("").source.startswith("cache") and len(counting_probe) == 1     # still busy: kept
    monkeypatch.setattr(hardware, "_load_per_core", lambda: 0.5)
    assert hardware.load("").load == 0.2 and len(counting_probe) == 2
    assert hardware.load("").source.startswith("cache") and len(counting_probe) == 2
    assert "measured at load" not in hardware.load("").describe()


def test_file_override_reuses_another_machines_measurements(counting_probe, tmp_path):
    hardware.load("")
    other = tmp_path / "other.json"
    other.write_text(open(hardware.cache_path()).read())
    m = hardware.load(f"@{other},bf16=fast")
    assert len(counting_probe) == 1 and m.source == f"file {other}" and m.forced == {"bf16": "fast"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"machine": {"cpu": "x"}}))
    with pytest.raises(ProbeOverrideError, match="not a hardware measurement file"):
        hardware.load(f"@{bad}")


@pytest.mark.parametrize("text, message", [
    ("bf16=medium", r"item 1 'bf16=medium': bf16 takes fast or slow"),
    ("gemm=torch,blas=mkl", r"item 2 'blas=mkl': unknown answer 'blas'; choose one of bf16, fp16, gemm, attention"),
    ("fast", r"item 1 'fast': expected KEY=VALUE, remeasure, nocache or @file.json"),
    ("@/no/such/file.json", r"no such file"),
])
def test_override_errors_name_the_item_and_the_fix(text, message):
    with pytest.raises(ProbeOverrideError, match=message) as err:
        hardware.parse_override(text)
    assert "MEGATRON_ALCOT_PROBE" in str(err.value)


def test_override_parsing():
    ov = hardware.parse_override(" bf16=slow , gemm=onednn,remeasure,,nocache")
    assert ov.forced == {"bf16": "slow", "gemm": "onednn"} and ov.remeasure and ov.nocache and ov.file is None


def test_bf16_on_a_slow_bf16_cpu_warns_on_one_line(machine_is):
    class Cfg:
        cpu_gemm_backend, attention_backend = "auto", "auto"
    machine_is(fake(bf16_speedup=0.2))
    lines = []
    hardware.report(Cfg(), torch.bfloat16, "cpu", emit=lines.append)
    warnings = [l for l in lines if "warning" in l]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "--bf16 on a CPU where bf16 matmul 0.20x fp32's speed" in warnings[0] and "going on" in warnings[0]
    assert any(l.startswith("[hardware] --attention-backend auto -> ") for l in lines)
    assert not any("--cpu-gemm-backend" in l for l in lines)   # autocast: the fp32 GEMM flag does not apply

    machine_is(fake(bf16_speedup=1.05))                        # not faster, not slower: no warning
    lines.clear()
    hardware.report(Cfg(), torch.bfloat16, "cpu", emit=lines.append)
    assert not any("warning" in l for l in lines)
    machine_is(dataclasses.replace(fake(bf16_speedup=3.0), forced={"bf16": "slow"}))
    assert "forced slow by MEGATRON_ALCOT_PROBE" in hardware.slow_precision_warning(torch.bfloat16, "--bf16")

    lines.clear()
    hardware.report(Cfg(), None, "cpu", emit=lines.append)     # fp32: one line per auto flag
    assert [l.split(" auto ->")[0] for l in lines] == ["[hardware] --cpu-gemm-backend", "[hardware] --attention-backend"]


def _share_body(rank, world_size):
    from megatron_alcot import hardware as hw
    hw.set_machine(fake(bf16_speedup=4.0 if rank == 0 else 0.1, onednn_speedup=2.0 if rank == 0 else 0.5))
    m = hw.share_from_rank0(torch.device("cpu"))
    return m.bf16_speedup, m.onednn_speedup, m.source, hw.precision_choice("cpu").choice


@pytest.mark.slow
def test_every_rank_takes_rank0s_answers():
    out = run_distributed(_share_body, 2)
    assert out[0][:2] == out[1][:2] == (4.0, 2.0)
    assert out[1][2].startswith("rank 0") and out[0][3] == out[1][3] == "bf16"


@pytest.mark.probe
def test_real_probe_measures_finite_ratios(monkeypatch, tmp_path):
    monkeypatch.setenv(hardware.CACHE_ENV, str(tmp_path))
    m = hardware.load("remeasure")
    for name in ("bf16_speedup", "fp16_speedup", "unfused_speedup_fp32", "unfused_speedup_bf16"):
        assert math.isfinite(getattr(m, name)) and getattr(m, name) > 0, name
    assert (m.onednn_speedup > 0) == gemm.onednn_available()
    assert hardware.load("").source.startswith("cache")


@pytest.mark.probe
def test_the_probe_times_real_kernels_when_first_called_while_building_on_meta(monkeypatch, tmp_path):
    monkeypatch.setenv(hardware.CACHE_ENV, str(tmp_path))
    gemm.onednn_available.cache_clear()
    try:
        with torch.device("meta"), torch.autocast("cpu", dtype=torch.bfloat16):
            m = hardware.load("nocache")
    finally:
        gemm.onednn_available.cache_clear()
    assert (m.onednn_speedup > 0) == gemm.onednn_available()


def test_describe_cpu_names_model_isa_and_limits(monkeypatch):
    from megatron_alcot import hardware
    model, _ = hardware._cpuinfo()
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    plain = hardware.describe_cpu()
    assert plain.startswith(model + " [") and "limited by" not in plain
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert "limited by ATEN_CPU_CAPABILITY=avx2" in hardware.describe_cpu()
