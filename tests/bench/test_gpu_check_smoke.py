"""bench/gpu_check.py --smoke runs every stage of the one-GPU check on CPU and writes its page, so
the GPU script cannot rot between GPU runs."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    page = tmp_path / "bench_gpu.md"
    assert _load().main(["--smoke", "--output", str(page)]) == 0
    text = page.read_text()
    assert "--smoke" in text and "## Errors" not in text
    for heading in ("## 1. Equivalence", "## 2. Training MFU", "## 3. ALCoT", "## 4. Peak memory"):
        assert heading in text, heading
    assert text.count("| pass |") == 3 and "FAIL" not in text


def test_gpu_check_refuses_smoke_without_output_and_gpu_run_without_cuda():
    module = _load()
    with pytest.raises(SystemExit):
        module.main(["--smoke"])
    if not module.torch.cuda.is_available():
        with pytest.raises(SystemExit):
            module.main([])


def test_peak_table_by_device_name():
    module = _load()
    assert module.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert module.peak_tflops("NVIDIA H200") == 989.0
    assert module.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert module.peak_tflops("Some GPU") is None
