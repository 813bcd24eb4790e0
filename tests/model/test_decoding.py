"""Incremental decoding with the (layer, lap) KV cache equals the parallel training forward:
same halting decisions, logits within 1e-5 (fp32), the cache holds exactly Σ_t (1+ℓ_t) entries per
layer; greedy generation equals the argmax of the parallel forward re-run on the growing sequence."""
import pytest
import torch

from alcot_reference import routers_random
from megatron_alcot.model import build_model
from megatron_alcot.model.generation import generate
from megatron_alcot.model.kv_cache import LatentKVCache, decode
from megatron_alcot.model.presets import preset

pytestmark = pytest.mark.usefixtures("one_thread")

S, K, TAU = 20, 3, 0.3


def _model(method="alcot", **kw):
    cfg = preset("tiny", latent_method=method, latent_max_steps=K, seq_length=S,
                 latent_threshold=TAU, **kw)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    routers_random(model, std=0.15)
    return model


def _tokens(b=2, s=S, seed=0):
    return torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(seed))


def _decode_stepwise(model, tokens, halting, prefill=0):
    cache = LatentKVCache()
    chunks = [tokens[:, :prefill]] if prefill else []
    chunks += [tokens[:, t:t + 1] for t in range(prefill, tokens.shape[1])]
    outs = [decode(model, cache, c, halting) for c in chunks]
    return (torch.cat([o.logits for o in outs], 1), torch.cat([o.num_steps for o in outs], 1), cache)


def _check_margin(out):
    """Learned decisions must not sit on τ, or 1e-7 float noise could flip them."""
    reach = torch.cumprod(out.continue_prob, -1)
    ran = out.lap_executed[:-1].permute(1, 2, 0)
    assert (reach - TAU).abs()[ran].min() > 1e-4


@pytest.mark.parametrize("halting,readout", [("always", "hidden"), ("never", "hidden"),
                                             ("learned", "hidden"), ("learned", "prob")])
def test_token_by_token_decoding_equals_parallel_forward(halting, readout):
    model = _model(latent_readout=readout)
    for b in (1, 2):      # batch 2: rows halt differently, the cache keeps invalid padding slots
        tokens = _tokens(b)
        with torch.no_grad():
            full = model(tokens, halting=halting)
        logits, steps, cache = _decode_stepwise(model, tokens, halting)
        assert torch.equal(steps, full.num_steps)
        torch.testing.assert_close(logits, full.logits, atol=1e-5, rtol=0)
        expected = {"always": {0}, "never": {K}, "learned": set(range(K + 1))}[halting]
        assert set(full.num_steps.unique().tolist()) == expected   # learned: some halt at every step
        if halting == "learned":
            _check_margin(full)
        # Exactly the executed (t, k) entries, per layer and per lap.
        assert cache.num_entries() == int((1 + full.num_steps).sum())
        for k in range(K + 1):
            assert cache.num_entries(k=k) == int((full.num_steps >= k).sum())
        if b == 1:
            assert cache.allocated_entries() == cache.num_entries()


def test_prefill_harvests_the_parallel_keys_and_chunks_compose():
    model = _model()
    tokens = _tokens(1)
    with torch.no_grad():
        full = model(tokens, return_kv=True)
    logits, steps, cache = _decode_stepwise(model, tokens, "learned", prefill=7)
    assert torch.equal(steps, full.num_steps)
    torch.testing.assert_close(logits, full.logits, atol=1e-5, rtol=0)
    # The cached step-k block of layer i holds the parallel forward's keys of the executed (t, k),
    # in token order, with their positions.
    for k, kv in enumerate(full.kv):
        for layer in range(model.config.num_layers):
            keys, values, positions, valid = cache[layer, k]
            ran = (full.num_steps[0] >= k).nonzero().squeeze(1)
            assert torch.equal(positions[0][valid[0]], ran)
            ref = kv.keys[layer][0][:, kv.valid[0]]
            torch.testing.assert_close(keys[0][:, valid[0]], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["vanilla", "loop", "pause", "ponder"])
def test_other_methods_decode_like_their_parallel_forward(method):
    model = _model(method)
    tokens = _tokens(2, 12)
    with torch.no_grad():
        full = model(tokens)
    logits, steps, cache = _decode_stepwise(model, tokens, "learned", prefill=3)
    assert torch.equal(steps, full.num_steps)
    torch.testing.assert_close(logits, full.logits, atol=1e-5, rtol=0)
    per_token = {"vanilla": 1, "loop": K + 1, "pause": K + 1, "ponder": K + 1}[method]
    assert cache.num_entries() == per_token * tokens.numel()


@pytest.mark.parametrize("method", ["alcot", "vanilla", "pause"])
def test_greedy_generate_equals_rerunning_the_parallel_forward(method):
    model = _model(method)
    prompt = _tokens(2, 6, seed=3)
    res = generate(model, prompt, max_new_tokens=8)
    seq, steps = prompt, []
    with torch.no_grad():
        for _ in range(8):
            out = model(seq)
            seq = torch.cat([seq, out.logits[:, -1, :256].argmax(-1, keepdim=True)], 1)
            steps.append(out.num_steps[:, -1])
    assert torch.equal(res.tokens, seq)
    assert torch.equal(res.latent_steps, torch.stack(steps, 1))
    assert torch.equal(res.prompt_latent_steps, model(prompt).num_steps)
    if method == "alcot":
        assert len(res.latent_steps.unique()) > 1
        # The cache holds the prompt and every generated token but the last (never fed back).
        executed = model(seq[:, :-1]).num_steps
        assert res.cache.num_entries() == int((1 + executed).sum())
    recompute = generate(model, prompt, max_new_tokens=8, use_cache=False)
    assert torch.equal(recompute.tokens, res.tokens)
    assert torch.equal(recompute.latent_steps, res.latent_steps)


def test_generate_batch_rows_sampling_and_eos():
    model = _model()
    prompt = _tokens(2, 5, seed=4)
    both = generate(model, prompt, 5)
    for row in range(2):
        one = generate(model, prompt[row], 5)
        assert torch.equal(one.tokens[0], both.tokens[row])
        assert torch.equal(one.latent_steps[0], both.latent_steps[row])
    a = generate(model, prompt, 5, greedy=False, temperature=0.7, top_k=20, seed=11)
    b = generate(model, prompt, 5, greedy=False, temperature=0.7, top_k=20, seed=11)
    assert torch.equal(a.tokens, b.tokens)
    top1 = generate(model, prompt, 5, greedy=False, top_k=1, seed=5)
    assert torch.equal(top1.tokens, both.tokens)
    eos = int(both.new_tokens[0, 2])
    stopped = generate(model, prompt[:1], 6, eos_id=eos)
    first = int((stopped.new_tokens[0] == eos).nonzero()[0])
    assert stopped.new_tokens.shape[1] == first + 1      # a single row stops at its EOS
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, torch.tensor([[1, 999]]), 2)


def _tp_generate(rank, world_size):
    from megatron_alcot.config import ParallelConfig
    from megatron_alcot.parallel import parallel_state
    if world_size > 1:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    cfg = preset("tiny-tp4", latent_max_steps=K, seq_length=S, latent_threshold=TAU, vocab_size=250)
    model = build_model(cfg, ParallelConfig(tensor_model_parallel_size=world_size)).eval()
    routers_random(model, std=0.15)
    res = generate(model, _tokens(2, 6, seed=5) % 250, 6, greedy=False, top_k=30, seed=3)
    return res.tokens.tolist(), res.latent_steps.tolist(), res.cache.num_entries()


@pytest.mark.slow
def test_tensor_parallel_generation_equals_single_process():
    from dist_utils import run_distributed
    ref = _tp_generate(0, 1)
    for got in run_distributed(_tp_generate, 2):
        assert got == ref
