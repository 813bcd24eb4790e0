"""--cpu-gemm-backend: oneDNN's fp32 GEMMs compute what torch's do (linear forward and backward,
the fused LM head + cross entropy, the ALCoT model with compacted, row-bucketed laps, a compiled
layer), only where they should run, and row bucketing keeps the set of GEMM shapes small."""

import pytest
import torch
import torch.nn.functional as F

from megatron_alcot.config import ConfigError
from megatron_alcot.model import build_model
from megatron_alcot.model.presets import preset
from megatron_alcot.parallel.tensor_parallel import gemm
from megatron_alcot.parallel.tensor_parallel.fused_linear_cross_entropy import fused_linear_cross_entropy
from megatron_alcot.parallel.tensor_parallel.layers import ColumnParallelLinear

BACKENDS = ["torch", pytest.param("onednn", marks=pytest.mark.skipif(
    not gemm.onednn_available(), reason="torch built without oneDNN"))]


def _rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transposed_input", [False, True])
def test_linear_matches_float64(backend, transposed_input):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 48, 70, generator=g).transpose(1, 2) if transposed_input else \
        torch.randn(3, 70, 48, generator=g)
    x.requires_grad_(True)
    w = torch.randn(40, 48, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True)
    dy = torch.randn(3, 70, 40, generator=g)
    y = gemm.linear(x, w, b, backend)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    y64 = F.linear(x64, w64, b64)
    ref = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    assert y.shape == y64.shape and y.dtype == torch.float32
    for got, want in zip((y, dx, dw, db), (y64, *ref)):
        assert got.shape == want.shape
        assert _rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fan_in,fan_out", [(32, 96), (96, 32)])
def test_weight_grad_both_operand_orders(backend, fan_in, fan_out):
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(200, fan_in, generator=g), torch.randn(200, fan_out, generator=g)
    got = gemm.weight_grad(x, dy, backend)
    assert got.shape == (fan_out, fan_in)
    assert _rel_err(got, dy.double().t() @ x.double()) < 1e-5
    m = torch.randn(fan_out, 7, generator=g)
    assert _rel_err(gemm.matmul_nn(dy, m, backend), dy.double() @ m.double()) < 1e-5
    k = torch.randn(9, fan_in, generator=g)
    assert _rel_err(gemm.matmul_nt(x, k, backend), x.double() @ k.double().t()) < 1e-5


@pytest.mark.skipif(not gemm.onednn_available(), reason="torch built without oneDNN")
def test_onednn_runs_only_on_plain_fp32_cpu():
    x32, w32 = torch.ones(4, 8), torch.ones(3, 8)
    assert gemm.resolve_gemm_backend("onednn", x32, w32) == "onednn"
    assert gemm.resolve_gemm_backend("torch", x32, w32) == "torch"
    assert gemm.resolve_gemm_backend("onednn", x32.double(), w32.double()) == "torch"
    assert gemm.resolve_gemm_backend("onednn", x32.bfloat16(), w32.bfloat16()) == "torch"
    with torch.autocast("cpu", dtype=torch.bfloat16):      # autocast already runs oneDNN's bf16 GEMM
        assert gemm.resolve_gemm_backend("onednn", x32, w32) == "torch"
        assert gemm.linear(x32, w32, None, "onednn").dtype == torch.bfloat16
    auto = gemm.resolve_gemm_backend("auto", x32, w32)
    assert auto == ("onednn" if gemm.auto_prefers_onednn() else "torch")
    with pytest.raises(ValueError, match="--cpu-gemm-backend"):
        gemm.resolve_gemm_backend("blas", x32, w32)


def test_bucket_rows_bounds_padding_and_shapes():
    buckets = set()
    for n in range(1, 1 << 14):
        b = gemm.bucket_rows(n)
        assert b >= n and b % 64 == 0
        if n >= 512:
            assert b - n <= n / 8
        buckets.add(b)
    # 8 multiples of 64 up to 512, then at most 8 sizes per octave up to 16384.
    assert len(buckets) <= 8 + 8 * 5
    assert gemm.bucket_rows(1024) == 1024 and gemm.bucket_rows(1025) == 1152


@pytest.mark.skipif(not gemm.onednn_available(), reason="torch built without oneDNN")
def test_fused_cross_entropy_same_in_both_libraries():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 150, 32, generator=g)
    w = torch.randn(384, 32, generator=g) * 0.1      # 300 real tokens, 84 rows of vocab padding
    target = torch.randint(0, 300, (2, 150), generator=g)
    weights = (torch.rand(2, 150, generator=g) > 0.2).float()
    weights /= weights.sum()
    out = {}
    for backend in ("torch", "onednn"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, per_token = fused_linear_cross_entropy(hh, ww, target, weights, 300, chunk_rows=64,
                                                     gemm_backend=backend)
        loss.backward()
        out[backend] = (loss, per_token, hh.grad, ww.grad)
    for a, b in zip(out["onednn"], out["torch"]):
        assert _rel_err(a, b) < 1e-5
    assert out["onednn"][3][300:].abs().max() == 0      # padding rows of the head get no gradient


@pytest.mark.skipif(not gemm.onednn_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("method", ["vanilla", "alcot"])
def test_model_same_loss_and_gradients_in_both_libraries(method):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (3, 40), generator=g)
    labels = torch.randint(0, 256, (3, 40), generator=g)
    results = {}
    for backend in ("torch", "onednn"):
        cfg = preset("tiny", seq_length=40, latent_method=method, latent_threshold=0.2,
                     cpu_gemm_backend=backend)
        model = build_model(cfg, seed=4)
        with torch.no_grad():       # random routers: a mixture of depths, so laps get compacted
            rg = torch.Generator().manual_seed(5)
            for r in getattr(model.latent, "routers", []):
                r.weight.copy_(torch.randn(r.weight.shape, generator=rg) * 0.15)
                r.bias.fill_(0.5)
        out = model(tokens, labels=labels)
        out.loss.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
        results[backend] = (out, grads)
    (a, ga), (b, gb) = results["onednn"], results["torch"]
    if method == "alcot":     # some tokens halt early: compacted laps with bucketed (padded) rows
        assert torch.equal(a.num_steps, b.num_steps) and len(a.num_steps.unique()) >= 2
    assert _rel_err(a.loss, b.loss) < 1e-5
    for x, y in zip(ga, gb):
        assert (x - y).abs().max() <= 1e-4 * y.abs().max().clamp_min(1e-6)


def test_config_names_the_flag():
    with pytest.raises(ConfigError, match="--cpu-gemm-backend"):
        preset("tiny", cpu_gemm_backend="openblas").validate()


@pytest.mark.skipif(not gemm.onednn_available(), reason="torch built without oneDNN")
def test_compiled_layer_calls_onednn_and_matches_eager():
    pytest.importorskip("torch._inductor")
    import shutil
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor needs a C++ compiler on CPU")
    torch.manual_seed(5)
    layer = ColumnParallelLinear(16, 24, bias=True, gemm_backend="onednn")
    x = torch.randn(64, 16, requires_grad=True)
    eager = layer(x)
    ge = torch.autograd.grad(eager.square().sum(), (x, layer.weight, layer.bias))
    compiled = torch.compile(layer)
    out = compiled(x)
    gc = torch.autograd.grad(out.square().sum(), (x, layer.weight, layer.bias))
    assert _rel_err(out, eager) < 1e-6
    for a, b in zip(gc, ge):
        assert _rel_err(a, b) < 1e-5


@pytest.mark.skipif(not gemm.onednn_available(), reason="torch built without oneDNN")
def test_chunked_target_logprob_same_in_both_libraries():
    from megatron_alcot.parallel.tensor_parallel.cross_entropy import chunked_target_logprob
    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(203, 32, generator=g), torch.randn(384, 32, generator=g) * 0.2
    target = torch.randint(0, 300, (203,), generator=g)
    ref = torch.log_softmax(h.double() @ w[:300].double().t(), -1).gather(-1, target[:, None]).squeeze(-1)
    for backend in ("torch", "onednn"):     # 203 rows in chunks of 64: padded to 64-row buckets
        got = chunked_target_logprob(h, w, target, chunk_rows=64, chunk_vocab=100, vocab_size=300,
                                     gemm_backend=backend)
        assert (got.double() - ref).abs().max() < 1e-5


def test_target_logprob_chunks_sized_by_device():
    from megatron_alcot.parallel.tensor_parallel.cross_entropy import (chunked_target_logprob,
                                                                       target_prob_chunk_rows)
    assert target_prob_chunk_rows("cpu", 4096) == 4096          # the quickstart's vocabulary
    assert target_prob_chunk_rows("cpu", 50304) * 50304 * 4 <= 64 << 20
    assert target_prob_chunk_rows("cuda", 50304) >= 4096
    g = torch.Generator().manual_seed(7)
    h, w = torch.randn(300, 16, generator=g), torch.randn(200, 16, generator=g) * 0.2
    target = torch.randint(0, 200, (300,), generator=g)
    ref = torch.log_softmax(h.double() @ w.double().t(), -1).gather(-1, target[:, None]).squeeze(-1)
    for rows in (None, 7, 300):                  # device-sized default and explicit chunks agree
        got = chunked_target_logprob(h, w, target, chunk_rows=rows, gemm_backend="torch")
        assert (got.double() - ref).abs().max() < 1e-5
