"""Tensor-parallel layers, mappings and vocab-parallel CE at TP = 2 and 4 against the
single-process (TP = 1) computation: forward outputs, input gradients and gathered weight gradients.

The TP = 1 reference runs in the test process; each spawned world runs every check (several TP
sizes one after another) so that only two worlds are started.
"""
import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from megatron_alcot.parallel import parallel_state
from megatron_alcot.parallel.tensor_parallel import (
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, chunked_target_prob,
    copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region, get_rng_tracker, init_method_normal, model_parallel_seed,
    parallel_lm_logits,
    padded_vocab_init, reduce_from_tensor_model_parallel_region, reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region, scatter_to_tensor_model_parallel_region,
    vocab_parallel_cross_entropy, vocab_parallel_target_logprob, vocab_parallel_target_prob)
from tp_helpers import close, merged, my_shard

B, S, H, FFN, VOCAB, TRUE_VOCAB = 2, 4, 8, 16, 32, 27
INIT = init_method_normal(0.3)


def build(kind, **kw):
    """Each layer kind gets its own seed, so SP and non-SP variants share weights."""
    offset = {"col": 1, "colg": 2, "fc1": 3, "fc2": 4, "rowf": 5, "emb": 6, "head": 7}[kind]
    model_parallel_seed(100 + offset)
    if kind == "col":
        layer = ColumnParallelLinear(H, FFN, bias=True, init_method=INIT, **kw)
    elif kind == "colg":
        layer = ColumnParallelLinear(H, FFN, gather_output=True, init_method=INIT)
    elif kind == "fc1":
        layer = ColumnParallelLinear(H, 2 * FFN, stride=2, init_method=INIT, **kw)
    elif kind == "fc2":
        layer = RowParallelLinear(FFN, H, bias=True, init_method=INIT, **kw)
    elif kind == "rowf":
        layer = RowParallelLinear(FFN, H, input_is_parallel=False, init_method=INIT)
    elif kind == "emb":
        layer = VocabParallelEmbedding(VOCAB, H, init_method=padded_vocab_init(INIT, TRUE_VOCAB), **kw)
    else:
        layer = ColumnParallelLinear(H, VOCAB, init_method=INIT)
    if getattr(layer, "bias", None) is not None:
        # Non-zero bias so that the forward checks see it; each rank keeps its shard.
        full = torch.linspace(-1, 1, layer.bias.numel() * parallel_state.get_tensor_model_parallel_world_size())
        with torch.no_grad():
            layer.bias.copy_(my_shard(full, 0, layer.bias.partition_stride) if layer.bias.tensor_model_parallel
                             else torch.linspace(-1, 1, layer.bias.numel()))
    return layer


def swiglu(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def _inputs():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {"x": r(B, S, H), "g_ffn": r(B, S, FFN), "g_h": r(B, S, H), "z": r(B, S, FFN),
            "ids": torch.randint(0, TRUE_VOCAB, (B, S), generator=g),
            "target": torch.randint(0, TRUE_VOCAB, (B, S), generator=g),
            "g_tok": r(B, S), "logits": 3 * r(B, S, VOCAB)}


def reference():
    """The single-process computation every TP world must reproduce."""
    inp, ref = _inputs(), {}
    layers = {k: build(k) for k in ("col", "colg", "fc1", "fc2", "rowf", "emb", "head")}
    ref["weights"] = {k: l.weight.detach().clone() for k, l in layers.items()}
    x = leaf(inp["x"])
    y = layers["col"](x)
    close(y, F.linear(inp["x"], layers["col"].weight, layers["col"].bias), "TP=1 column is F.linear")
    (y * inp["g_ffn"]).sum().backward()
    ref["col"] = (y.detach(), x.grad, layers["col"].weight.grad, layers["col"].bias.grad)
    x = leaf(inp["x"])
    y = layers["colg"](x)
    (y * inp["g_ffn"]).sum().backward()
    ref["colg"] = (y.detach(), x.grad, layers["colg"].weight.grad)
    x = leaf(inp["x"])
    out = layers["fc2"](swiglu(layers["fc1"](x)))
    (out * inp["g_h"]).sum().backward()
    ref["mlp"] = (out.detach(), x.grad, layers["fc1"].weight.grad, layers["fc2"].weight.grad,
                  layers["fc2"].bias.grad)
    z = leaf(inp["z"])
    out = layers["rowf"](z)
    (out * inp["g_h"]).sum().backward()
    ref["rowf"] = (out.detach(), z.grad, layers["rowf"].weight.grad)
    out = layers["emb"](inp["ids"])
    close(out, F.embedding(inp["ids"], layers["emb"].weight), "TP=1 embedding")
    (out * inp["g_h"]).sum().backward()
    ref["emb"] = (out.detach(), layers["emb"].weight.grad)
    for ls in (0.0, 0.1):
        x = leaf(inp["x"])
        logits = layers["head"](x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), inp["target"].reshape(-1), reduction="none",
                               label_smoothing=ls).reshape(B, S)
        (loss * inp["g_tok"]).sum().backward()
        ref[f"ce{ls}"] = (loss.detach(), x.grad, layers["head"].weight.grad.clone())
        layers["head"].weight.grad = None
    logits = inp["logits"]
    ref["logprob"] = torch.log_softmax(logits, -1).gather(-1, inp["target"].unsqueeze(-1)).squeeze(-1)
    ref["logits_grad"] = {}
    for ls in (0.0, 0.1):
        lg = leaf(logits)
        F.cross_entropy(lg.reshape(-1, VOCAB), inp["target"].reshape(-1), reduction="none",
                        label_smoothing=ls).reshape(B, S).mul(inp["g_tok"]).sum().backward()
        ref["logits_grad"][ls] = lg.grad
    dense = inp["x"] @ ref["weights"]["head"].t()
    ref["head_prob"] = torch.softmax(dense, -1).gather(-1, inp["target"].unsqueeze(-1)).squeeze(-1)
    return inp, ref


def _check_init(ref, tp):
    for kind, full in ref["weights"].items():
        layer = build(kind)
        w = layer.weight
        assert w.tensor_model_parallel and w.partition_dim == (1 if kind in ("fc2", "rowf") else 0)
        assert w.partition_stride == (2 if kind == "fc1" else 1)
        assert torch.equal(w, my_shard(full, w.partition_dim, w.partition_stride)), f"{kind} init, TP={tp}"
    emb = build("emb")
    rows = merged(emb.weight.detach(), 0)
    assert torch.count_nonzero(rows[TRUE_VOCAB:]) == 0, "padding rows start at zero"


def _check_layers(inp, ref, tp):
    col = build("col")
    x = leaf(inp["x"])
    y = col(x)
    (y * my_shard(inp["g_ffn"], -1)).sum().backward()
    y_ref, xg, wg, bg = ref["col"]
    close(y, my_shard(y_ref, -1), f"column output TP={tp}")
    close(x.grad, xg, f"column input grad TP={tp}")
    close(merged(col.weight.grad, 0), wg, f"column weight grad TP={tp}")
    close(merged(col.bias.grad, 0), bg, f"column bias grad TP={tp}")

    colg = build("colg")
    x = leaf(inp["x"])
    y = colg(x)
    (y * inp["g_ffn"]).sum().backward()
    close(y, ref["colg"][0], f"gather_output column TP={tp}")
    close(x.grad, ref["colg"][1], f"gather_output input grad TP={tp}")
    close(merged(colg.weight.grad, 0), ref["colg"][2], f"gather_output weight grad TP={tp}")

    rowf = build("rowf")
    z = leaf(inp["z"])
    out = rowf(z)
    (out * inp["g_h"]).sum().backward()
    close(out, ref["rowf"][0], f"row (replicated input) output TP={tp}")
    close(z.grad, ref["rowf"][1], f"row (replicated input) input grad TP={tp}")
    close(merged(rowf.weight.grad, 1), ref["rowf"][2], f"row weight grad TP={tp}")

    # SwiGLU MLP: fc1 stride 2 keeps [gate_r; up_r], so the local chunk(2) is the right split.
    out_ref, xg, w1g, w2g, b2g = ref["mlp"]
    for sp, dim, shape in ((False, 0, (B, S, H)), (True, 1, (B, S, H)), (True, 0, (B * S, H))):
        fc1 = build("fc1", sequence_parallel=sp, sequence_dim=dim)
        fc2 = build("fc2", sequence_parallel=sp, sequence_dim=dim)
        x = inp["x"].reshape(shape)
        x = leaf(my_shard(x, dim) if sp else x)
        out = fc2(swiglu(fc1(x)))
        o_ref, g = out_ref.reshape(shape), inp["g_h"].reshape(shape)
        xg_ref = xg.reshape(shape)
        if sp:
            o_ref, g, xg_ref = my_shard(o_ref, dim), my_shard(g, dim), my_shard(xg_ref, dim)
        (out * g).sum().backward()
        what = f"MLP TP={tp} sequence_parallel={sp} dim={dim}"
        close(out, o_ref, f"{what} output")
        close(x.grad, xg_ref, f"{what} input grad")
        close(merged(fc1.weight.grad, 0, 2), w1g, f"{what} fc1 weight grad")
        close(merged(fc2.weight.grad, 1), w2g, f"{what} fc2 weight grad")
        close(fc2.bias.grad, b2g, f"{what} fc2 bias grad")

    for sp in (False, True):
        emb = build("emb", sequence_parallel=sp, sequence_dim=1)
        out = emb(inp["ids"])
        o_ref, g = ref["emb"][0], inp["g_h"]
        if sp:
            o_ref, g = my_shard(o_ref, 1), my_shard(g, 1)
        (out * g).sum().backward()
        close(out, o_ref, f"embedding output TP={tp} sp={sp}")
        close(merged(emb.weight.grad, 0), ref["emb"][1], f"embedding weight grad TP={tp} sp={sp}")


def _check_cross_entropy(inp, ref, tp):
    target = inp["target"]
    for ls, tied in ((0.0, False), (0.1, True)):
        head = build("head")
        x = leaf(inp["x"])
        logits = parallel_lm_logits(x, head.weight) if tied else head(x)
        loss = vocab_parallel_cross_entropy(logits, target, label_smoothing=ls)
        (loss * inp["g_tok"]).sum().backward()
        loss_ref, xg, wg = ref[f"ce{ls}"]
        close(loss, loss_ref, f"LM head + CE loss TP={tp} ls={ls}")
        close(x.grad, xg, f"LM head + CE input grad TP={tp} ls={ls}")
        close(merged(head.weight.grad, 0), wg, f"LM head + CE weight grad TP={tp} ls={ls}")
        logits = leaf(my_shard(inp["logits"], -1))
        loss = vocab_parallel_cross_entropy(logits, target, label_smoothing=ls)
        close(loss, F.cross_entropy(inp["logits"].reshape(-1, VOCAB), target.reshape(-1), reduction="none",
                                    label_smoothing=ls).reshape(B, S), f"CE TP={tp} ls={ls}")
        (loss * inp["g_tok"]).sum().backward()
        close(logits.grad, my_shard(ref["logits_grad"][ls], -1), f"CE logits grad TP={tp} ls={ls}")
    logits_local = leaf(my_shard(inp["logits"], -1))
    logp = vocab_parallel_target_logprob(logits_local, target)
    p = vocab_parallel_target_prob(logits_local, target)
    assert not p.requires_grad and not logp.requires_grad
    close(logp, ref["logprob"], f"target logprob TP={tp}")
    close(p, ref["logprob"].exp(), f"target prob TP={tp}")
    # Large logits: max subtraction across ranks keeps it finite.
    big = vocab_parallel_target_prob(logits_local * 1000, target)
    close(big, torch.softmax(inp["logits"] * 1000, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1),
          f"target prob, large logits TP={tp}")
    head = build("head")
    hidden = inp["x"].reshape(-1, H)
    for rows, vocab_chunk in ((3, None), (5, 3), (4096, None)):
        p = chunked_target_prob(hidden, head.weight.detach(), target.reshape(-1), chunk_rows=rows,
                                chunk_vocab=vocab_chunk)
        close(p, ref["head_prob"].reshape(-1), f"chunked target prob TP={tp} rows={rows} vocab={vocab_chunk}")


def _check_mappings(inp, tp):
    rank = parallel_state.get_tensor_model_parallel_rank()
    scale = tp * (tp + 1) / 2            # sum over TP ranks of (rank + 1)
    x, g = inp["x"], inp["g_h"]
    a = leaf(x)
    (copy_to_tensor_model_parallel_region(a) * (rank + 1)).sum().backward()
    close(a.grad, torch.full_like(x, scale), f"copy_to grad TP={tp}")
    a = leaf(x * (rank + 1))
    y = reduce_from_tensor_model_parallel_region(a)
    (y * g).sum().backward()
    close(y, x * scale, f"reduce_from forward TP={tp}")
    close(a.grad, g, f"reduce_from grad TP={tp}")
    assert torch.equal(a, x * (rank + 1)), "reduce_from must not modify its input"
    a = leaf(x)
    y = scatter_to_tensor_model_parallel_region(a)
    (y * my_shard(g, -1)).sum().backward()
    close(y, my_shard(x, -1), f"scatter_to TP forward TP={tp}")
    close(a.grad, g, f"scatter_to TP grad TP={tp}")
    a = leaf(my_shard(x, -1))
    y = gather_from_tensor_model_parallel_region(a)
    (y * g).sum().backward()
    close(y, x, f"gather_from TP forward TP={tp}")
    close(a.grad, my_shard(g, -1), f"gather_from TP grad TP={tp}")
    for dim in (0, 1):
        xs, gs = x.reshape(B * S, H) if dim == 0 else x, g.reshape(B * S, H) if dim == 0 else g
        a = leaf(xs)
        y = scatter_to_sequence_parallel_region(a, dim)
        (y * my_shard(gs, dim)).sum().backward()
        close(y, my_shard(xs, dim), f"scatter_to SP dim={dim} TP={tp}")
        close(a.grad, gs, f"scatter_to SP grad dim={dim} TP={tp}")
        for tp_grad, factor in ((True, scale), (False, rank + 1)):
            a = leaf(my_shard(xs, dim))
            y = gather_from_sequence_parallel_region(a, dim, tensor_parallel_output_grad=tp_grad)
            (y * gs * (rank + 1)).sum().backward()
            close(y, xs, f"gather_from SP dim={dim} TP={tp}")
            close(a.grad, my_shard(gs, dim) * factor, f"gather_from SP grad dim={dim} tp_grad={tp_grad} TP={tp}")
        a = leaf(xs * (rank + 1))
        y = reduce_scatter_to_sequence_parallel_region(a, dim)
        (y * my_shard(gs, dim)).sum().backward()
        close(y, my_shard(xs * scale, dim), f"reduce_scatter SP dim={dim} TP={tp}")
        close(a.grad, gs, f"reduce_scatter SP grad dim={dim} TP={tp}")


def _check_rng(tp):
    from tp_helpers import gather_tp
    rank = parallel_state.get_tensor_model_parallel_rank()
    model_parallel_seed(7)
    same = torch.rand(5)
    with get_rng_tracker().fork():
        split = torch.rand(5)
    after = torch.rand(5)
    assert all(torch.equal(t, same) for t in gather_tp(same)), "default RNG must agree over TP"
    splits = gather_tp(split)
    assert all(not torch.equal(splits[i], splits[j]) for i in range(tp) for j in range(i)), \
        "forked RNG must differ over TP"
    assert torch.equal(split, torch.rand(5, generator=torch.Generator().manual_seed(7 + 2718 + rank)))
    torch.manual_seed(7)
    torch.rand(5)
    assert torch.equal(after, torch.rand(5)), "fork must not advance the default generator"


def _tp_body(rank, world_size, inp, ref, tp_sizes):
    for tp in tp_sizes:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        _check_init(ref, tp)
        _check_layers(inp, ref, tp)
        _check_cross_entropy(inp, ref, tp)
        _check_mappings(inp, tp)
        _check_rng(tp)
        parallel_state.destroy_model_parallel()
    return True


def test_tp1_mappings_are_identity_without_communication():
    x = torch.randn(3, 4)
    for fn in (copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
               scatter_to_tensor_model_parallel_region, gather_from_tensor_model_parallel_region,
               scatter_to_sequence_parallel_region, gather_from_sequence_parallel_region,
               reduce_scatter_to_sequence_parallel_region):
        assert fn(x) is x


def test_tp1_reference_matches_plain_torch():
    inp, ref = reference()
    loss = vocab_parallel_cross_entropy(inp["logits"], inp["target"])
    close(loss, -ref["logprob"], "TP=1 CE")
    close(vocab_parallel_cross_entropy(inp["logits"], inp["target"].int()), -ref["logprob"], "int32 targets")
    bf16 = vocab_parallel_cross_entropy(inp["logits"].bfloat16(), inp["target"])
    assert bf16.dtype == torch.float32
    close(bf16, F.cross_entropy(inp["logits"].bfloat16().float().reshape(-1, VOCAB), inp["target"].reshape(-1),
                                reduction="none").reshape(B, S), "bf16 logits, fp32 inside")


@pytest.mark.slow
def test_tp2_matches_single_process():
    inp, ref = reference()
    assert run_distributed(_tp_body, 2, inp, ref, [2]) == [True] * 2


@pytest.mark.slow
def test_tp4_and_tp2_dp2_match_single_process():
    inp, ref = reference()
    assert run_distributed(_tp_body, 4, inp, ref, [4, 2]) == [True] * 4
