"""A checkpoint saved at one TP/PP layout loads into another with identical tensors and logits.

Worlds are gloo on CPU (spawned). Chain: TP=2 save -> TP=1 load (+ save) -> TP=2 load, and
PP=2 save -> PP=1 load, TP=2 -> PP=2 load; the offline tool does the same on disk.
"""
import io
import os
import subprocess
import sys

import pytest
import torch

from dist_utils import run_distributed
from megatron_alcot.checkpointing import load_checkpoint, load_full_state_dict, save_checkpoint
from megatron_alcot.parallel import parallel_state
from megatron_alcot.parallel.tensor_parallel.random import model_parallel_seed
from standin import StandIn, config_dict

pytestmark = pytest.mark.slow

V = 1000                     # true vocabulary; padded 1056 at TP=1, 1152 at TP=2 (divisible by 96)
TOKENS = torch.arange(16).reshape(2, 8) * 61 % V
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _build(tp=1, pp=1, seed=1):
    if tp * pp > 1:
        parallel_state.initialize_model_parallel(tp, pp)
    model_parallel_seed(seed)
    model = StandIn(pp_stage=(parallel_state.get_pipeline_model_parallel_rank(), pp))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train_step(model, opt):
    loss = torch.nn.functional.cross_entropy(model(TOKENS)[..., :V].flatten(0, 1), TOKENS.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()


def _full_params_named(model):
    """(global name, parameter) pairs: layer indices shifted by the stage's layer offset."""
    for n, p in model.named_parameters():
        if n.startswith("decoder.layers."):
            i, rest = n.split(".", 3)[2:]
            n = f"decoder.layers.{int(i) + model.layer_offset}.{rest}"
        yield n, p


def _full_params(model, tp):
    """Global name -> this rank's tensor (for comparing with merged tensors)."""
    return {n: p.detach().clone() for n, p in _full_params_named(model)}


def _optim_states(model, opt):
    names = {id(p): n for n, p in _full_params_named(model)}
    return {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


def _save_tp2(rank, world, ckpt):
    model, opt = _build(tp=2)
    _train_step(model, opt)
    save_checkpoint(ckpt, 1, model, opt, consumed_samples=2, config_dict=config_dict())
    with torch.no_grad():
        logits = model(TOKENS)
    return _pack(logits, _full_params(model, 2), _optim_states(model, opt))


def _load_tp2(rank, world, ckpt):
    model, opt = _build(tp=2, seed=5)
    info = load_checkpoint(ckpt, model, opt)
    with torch.no_grad():
        logits = model(TOKENS)
    return _pack(info["resharded"], logits, _full_params(model, 2), _optim_states(model, opt))


def _pack(*objs):
    """Tensors by value (a queue would share them through file descriptors of an exiting child)."""
    buf = io.BytesIO()
    torch.save(objs, buf)
    return buf.getvalue()


def _unpack(results):
    return [torch.load(io.BytesIO(r), weights_only=True) for r in results]


def _fit(t, rows):
    """Vocab tensor cut or zero-padded to ``rows`` (what loading at another TP does)."""
    if t.shape[0] >= rows:
        return t[:rows]
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory):
    """(directory, per-rank (logits, params, optimizer states)) of one TP=2 training step."""
    ckpt = str(tmp_path_factory.mktemp("tp2"))
    return ckpt, _unpack(run_distributed(_save_tp2, 2, ckpt))


def test_tp2_to_tp1_to_tp2(tmp_path, tp2_checkpoint):
    a, saved = tp2_checkpoint
    b = str(tmp_path / "b")
    logits2 = saved[0][0]
    full, meta = load_full_state_dict(a, strip_vocab_padding=False)
    assert meta["topology"]["tp"] == 2 and meta["vocab"] == {"true_size": V, "padded_size": 1152}
    # load_full_state_dict merges exactly the shards each rank held.
    for name, t in full.items():
        info = meta["tensors"][name]
        if info["partition_dim"] < 0:
            assert torch.equal(t, saved[0][1][name])
        else:
            parts = torch.cat([saved[r][1][name] for r in range(2)], dim=info["partition_dim"])
            if info["partition_stride"] == 1:
                assert torch.equal(t, parts), name
    stripped, _ = load_full_state_dict(a)
    assert stripped["embedding.word_embeddings.weight"].shape == (V, 32)

    model1, opt1 = _build(tp=1, seed=9)
    info = load_checkpoint(a, model1, opt1)
    assert info["resharded"] and not info["rng_restored"]
    for name, p in model1.named_parameters():
        want = full[name] if not meta["tensors"][name]["vocab"] else _fit(full[name], p.shape[0])
        assert torch.equal(p, want), name
    with torch.no_grad():
        logits1 = model1(TOKENS)
    # TP changes the fp32 summation order (row-parallel all-reduce), so compare closely, not bitwise.
    torch.testing.assert_close(logits1[..., :V], logits2[..., :V], rtol=0, atol=2e-5)
    # Adam moments were resharded like their parameters.
    states1 = _optim_states(model1, opt1)
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    g = [saved[r][2][fc1]["exp_avg"] for r in range(2)]
    want = torch.cat([torch.cat([g[0].chunk(2)[0], g[1].chunk(2)[0]]),
                      torch.cat([g[0].chunk(2)[1], g[1].chunk(2)[1]])])
    assert torch.equal(states1[fc1]["exp_avg"], want)
    assert torch.equal(states1[fc1]["step"], saved[0][2][fc1]["step"])

    save_checkpoint(b, 1, model1, opt1, consumed_samples=2, config_dict=config_dict())
    back = _unpack(run_distributed(_load_tp2, 2, b))
    for r in range(2):
        resharded, logits, params, states = back[r]
        assert resharded
        assert torch.equal(logits[..., :V], logits2[..., :V])      # bitwise: same layout again
        for name, p in params.items():
            want = saved[r][1][name]
            if meta["tensors"][name]["vocab"]:          # global rows 1056.. were cut at TP=1
                rows = min(576, 1056 - r * 576)
                assert torch.equal(p[:rows], want[:rows]), name
                assert not p[rows:].any(), name
            else:
                assert torch.equal(p, want), name
        for name, s in states.items():
            if not meta["tensors"][name]["vocab"]:
                for k, v in s.items():
                    assert torch.equal(v, saved[r][2][name][k]), (name, k)


def _save_pp2(rank, world, ckpt):
    model, opt = _build(pp=2)
    for p in model.parameters():          # a deterministic optimizer step without a pipeline
        p.grad = torch.sin(p.detach() * 3)
    opt.step()
    save_checkpoint(ckpt, 4, model, opt, consumed_samples=8, config_dict=config_dict())
    return _pack(_full_params(model, 1), _optim_states(model, opt))


def _load_pp2(rank, world, ckpt):
    model, opt = _build(pp=2, seed=3)
    info = load_checkpoint(ckpt, model, opt)
    return _pack(info["resharded"], _full_params(model, 1), _optim_states(model, opt))


def test_pp2_to_pp1_and_tp2_to_pp2(tmp_path, tp2_checkpoint):
    a = str(tmp_path / "pp2")
    stages = _unpack(run_distributed(_save_pp2, 2, a))
    model, opt = _build(seed=4)
    assert load_checkpoint(a, model, opt)["resharded"]
    params, states = _full_params(model, 1), _optim_states(model, opt)
    merged = {**stages[0][0], **stages[1][0]}
    merged_states = {**stages[0][1], **stages[1][1]}
    assert set(params) == set(merged)
    for name, p in params.items():
        assert torch.equal(p, merged[name]), name
        for k, v in states[name].items():
            assert torch.equal(v, merged_states[name][k]), (name, k)

    b = tp2_checkpoint[0]
    full, _ = load_full_state_dict(b, strip_vocab_padding=False)
    loaded = _unpack(run_distributed(_load_pp2, 2, b))
    for resharded, params, _ in loaded:
        assert resharded
        for name, p in params.items():
            want = full[name] if not name.startswith(("embedding", "output")) else _fit(full[name], p.shape[0])
            assert torch.equal(p, want), name
    assert set(loaded[0][1]) | set(loaded[1][1]) == set(full)


def test_offline_tool(tmp_path, tp2_checkpoint):
    src = tp2_checkpoint[0]
    out = str(tmp_path / "tp1pp2")
    tool = os.path.join(REPO, "tools", "checkpoint", "reshard_checkpoint.py")
    res = subprocess.run([sys.executable, tool, "--load", src, "--save", out,
                          "--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "2"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    direct, direct_opt = _build(seed=2)
    load_checkpoint(src, direct, direct_opt)
    # The TP=1/PP=2 copy, read back at TP=1/PP=1, equals loading the original directly.
    via_tool, via_opt = _build(seed=3)
    info = load_checkpoint(out, via_tool, via_opt, load_rng=False)
    assert info["metadata"]["topology"] == {"tp": 1, "pp": 2, "dp": 1, "world": 2}
    for (n, a), b in zip(direct.named_parameters(), via_tool.parameters()):
        assert torch.equal(a, b), n
    for a, b in zip(_optim_states(direct, direct_opt).items(), _optim_states(via_tool, via_opt).items()):
        for k in a[1]:
            assert torch.equal(a[1][k], b[1][k]), (a[0], k)
    res = subprocess.run([sys.executable, tool, "--load", str(tmp_path / "nope"), "--save", out,
                          "--target-tensor-parallel-size", "1"], capture_output=True, text=True)
    assert res.returncode == 1 and "does not exist" in res.stderr


# --- the native model: TP=2 checkpoint -> TP=1 model, same logits --------------------------------
def _llama_cfg():
    from megatron_alcot.config import ModelConfig
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       vocab_size=V, make_vocab_size_divisible_by=96, seq_length=16,
                       latent_method="alcot", latent_max_steps=2, untie_embeddings_and_output_weights=True)


def _llama_logits(model):
    with torch.no_grad():
        logits = model(TOKENS).logits
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(parts, logits.contiguous(),
                                     group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits[..., :V]


def _save_llama_tp2(rank, world, ckpt):
    from megatron_alcot.config import ParallelConfig
    from megatron_alcot.model import build_model
    parallel_state.initialize_model_parallel(2, 1)
    model = build_model(_llama_cfg(), ParallelConfig(tensor_model_parallel_size=2), seed=11)
    with torch.no_grad():      # move off the init so that padding rows and norms are not trivial
        for p in model.parameters():
            p.add_(torch.sin(p * 7) * 0.01)
    save_checkpoint(ckpt, 2, model, consumed_samples=4,
                    config_dict={"model": _llama_cfg().to_dict()})
    return _pack(_llama_logits(model))


def test_native_model_tp2_to_tp1_logits(tmp_path):
    from megatron_alcot.model import build_model
    ckpt = str(tmp_path / "llama")
    logits2 = _unpack(run_distributed(_save_llama_tp2, 2, ckpt))[0][0]
    model = build_model(_llama_cfg(), seed=3)
    info = load_checkpoint(ckpt, model, config_dict={"model": _llama_cfg().to_dict()})
    assert info["resharded"] and info["metadata"]["vocab"]["padded_size"] == 1152
    full, _ = load_full_state_dict(ckpt, strip_vocab_padding=False)
    for name, p in model.named_parameters():
        want = _fit(full[name], p.shape[0]) if full[name].shape[0] == 1152 else full[name]
        assert torch.equal(p, want), name
    torch.testing.assert_close(_llama_logits(model), logits2, rtol=0, atol=5e-5)
