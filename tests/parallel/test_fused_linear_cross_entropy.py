"""The fused LM head + cross entropy against the unfused head and vocab-parallel CE: loss,
per-token loss and both gradients, at TP = 1 (fp32, bf16 autocast, padded vocabulary, masks,
chunk sizes), at TP = 2, and inside the model for vanilla, ALCoT and loop."""
import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from megatron_alcot.parallel.tensor_parallel.cross_entropy import (mask_padded_vocab,
                                                                   vocab_parallel_cross_entropy)
from megatron_alcot.parallel.tensor_parallel.fused_linear_cross_entropy import fused_linear_cross_entropy

N, H, VOCAB, PADDED = 37, 16, 90, 96


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, N, H, generator=g)
    w = torch.randn(PADDED, H, generator=g) * 0.3
    target = torch.randint(0, VOCAB, (3, N), generator=g)
    mask = (torch.rand(3, N, generator=g) > 0.3).float()
    return x, w, target, mask


def _unfused(x, w, target, mask):
    per_token = vocab_parallel_cross_entropy(mask_padded_vocab(F.linear(x, w), VOCAB), target)
    return (per_token * mask).sum() / mask.sum(), per_token


def _grads(fn, x, w, *args):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, per_token = fn(x, w, *args)
    (2.5 * loss).backward()
    return loss.detach(), per_token.detach(), x.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_fp32_matches_unfused(chunk):
    x, w, target, mask = _inputs()
    fused = _grads(lambda a, b: fused_linear_cross_entropy(a, b, target, mask / mask.sum(), VOCAB, chunk), x, w)
    ref = _grads(lambda a, b: _unfused(a, b, target, mask), x, w)
    for name, a, e in zip(("loss", "per-token loss", "d hidden", "d weight"), fused, ref):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert fused[3][VOCAB:].abs().max() == 0    # vocabulary padding gets no gradient


def test_bf16_autocast_matches_unfused():
    x, w, target, mask = _inputs(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _grads(lambda a, b: fused_linear_cross_entropy(a, b, target, mask / mask.sum(), VOCAB, 8), x, w)
        ref = _grads(lambda a, b: _unfused(a, b, target, mask), x, w)
    assert fused[2].dtype == torch.float32 and fused[3].dtype == torch.float32
    for name, a, e in zip(("loss", "per-token loss", "d hidden", "d weight"), fused, ref):
        torch.testing.assert_close(a, e, atol=2e-2, rtol=2e-2, msg=lambda m: f"{name}: {m}")


def test_bad_shapes_are_named():
    x, w, target, mask = _inputs()
    with pytest.raises(ValueError, match="must agree"):
        fused_linear_cross_entropy(x, w, target[:, :-1], mask[:, :-1], VOCAB)
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_linear_cross_entropy(x, w, target, mask, VOCAB, 0)


def _tp2_body(rank, world, inp, ref):
    from megatron_alcot.parallel import parallel_state
    from megatron_alcot.parallel.tensor_parallel import mappings
    from tp_helpers import merged, my_shard
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    x, w, target, mask = inp
    xs, ws = x.clone().requires_grad_(), my_shard(w, 0).clone().requires_grad_()
    loss, per_token = fused_linear_cross_entropy(mappings.copy_to_tensor_model_parallel_region(xs), ws,
                                                 target, mask / mask.sum(), VOCAB, 5)
    (2.5 * loss).backward()
    got = (loss.detach(), per_token, xs.grad, merged(ws.grad, 0))
    for name, a, e in zip(("loss", "per-token loss", "d hidden", "d weight"), got, ref):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"TP=2 {name}: {m}")
    return True


@pytest.mark.slow
def test_tp2_matches_single_process():
    inp = _inputs(2)
    ref = _grads(lambda a, b: _unfused(a, b, inp[2], inp[3]), inp[0], inp[1])
    assert run_distributed(_tp2_body, 2, inp, ref) == [True, True]


@pytest.mark.parametrize("method,steps", [("vanilla", 0), ("alcot", 2), ("loop", 2)])
def test_model_loss_and_grads_match_unfused(method, steps):
    from megatron_alcot.model import build_model
    from megatron_alcot.model.presets import preset
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (2, 12), generator=g)
    labels = torch.randint(0, 256, (2, 12), generator=g)
    mask = (torch.rand(2, 12, generator=g) > 0.2).float()
    results = []
    for fusion in (True, False):
        cfg = preset("tiny", latent_method=method, latent_max_steps=steps, seq_length=12,
                     cross_entropy_loss_fusion=fusion)
        model = build_model(cfg, seed=5)
        out = model(tokens, labels=labels, loss_mask=mask)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        with torch.no_grad():
            evaluated = model(tokens, labels=labels, loss_mask=mask)
        torch.testing.assert_close(evaluated.loss, out.loss.detach(), atol=1e-6, rtol=1e-5)
    (fused, g_fused), (plain, g_plain) = results
    assert not fused.per_token_loss.requires_grad
    torch.testing.assert_close(fused.loss, plain.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused.per_token_loss, plain.per_token_loss.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(fused.num_steps, plain.num_steps)
    assert g_fused.keys() == g_plain.keys()
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], atol=1e-6, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


def test_chunk_sizing_by_device():
    from megatron_alcot.parallel.tensor_parallel.fused_linear_cross_entropy import chunk_rows_for
    assert chunk_rows_for("cpu", 50304, 10**6) == 32            # ~4 MiB of fp32 logits
    gpu = chunk_rows_for("cuda", 50304, 4 * 2048)
    assert gpu >= 4096 and -(-4 * 2048 // gpu) <= 4              # weight read a bounded number of times
    assert -(-10**6 // chunk_rows_for("cuda", 50304, 10**6)) <= 4
    assert chunk_rows_for("cuda", 50304, 100) == 100 and chunk_rows_for("cpu", 8, 5) == 5


@pytest.mark.parametrize("device", ["cpu", "cuda", 32, 4096])
def test_device_sized_chunks_match_unfused(device):
    """The chunk sizes each device would pick (GPU sizing forced on CPU), the CPU's and the GPU's
    minimum row counts, against the unfused path."""
    from megatron_alcot.parallel.tensor_parallel.fused_linear_cross_entropy import chunk_rows_for
    x, w, target, mask = _inputs(2)
    x = x.repeat(1, 60, 1)                      # 3 x 2220 rows: two chunks at the GPU's 4096 minimum
    target, mask = target.repeat(1, 60), mask.repeat(1, 60)
    chunk = device if isinstance(device, int) else chunk_rows_for(device, PADDED, target.numel())
    fused = _grads(lambda a, b: fused_linear_cross_entropy(a, b, target, mask / mask.sum(), VOCAB, chunk), x, w)
    ref = _grads(lambda a, b: _unfused(a, b, target, mask), x, w)
    for name, a, e in zip(("loss", "per-token loss", "d hidden", "d weight"), fused, ref):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
