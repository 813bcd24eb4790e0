"""Numerical edge cases of the LM head and readouts: vocabulary padding takes no probability mass;
an exit mass that underflows to zero keeps gradients finite."""
import torch

from megatron_alcot.config import ModelConfig
from megatron_alcot.model import build_model
from megatron_alcot.parallel.tensor_parallel.cross_entropy import chunked_target_prob


def _cfg(**kw):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=200, seq_length=16,
                latent_method="alcot", latent_max_steps=2, untie_embeddings_and_output_weights=True)
    base.update(kw)
    return ModelConfig(**base)


def test_padded_columns_take_no_mass_and_loss_matches_true_vocab():
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg)
    with torch.no_grad():  # padding rows that drifted during training must still not matter
        model.output_layer.weight[cfg.vocab_size:] = torch.randn_like(model.output_layer.weight[cfg.vocab_size:])
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    labels = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = model(tokens, halting="never").logits
    assert logits.shape[-1] == cfg.padded_vocab_size() > cfg.vocab_size
    probs = logits.float().softmax(-1)
    assert probs[..., cfg.vocab_size:].max().item() == 0.0
    out = model(tokens, labels=labels, halting="never")
    ref = torch.nn.functional.cross_entropy(logits[..., :cfg.vocab_size].float().reshape(-1, cfg.vocab_size),
                                            labels.reshape(-1))
    torch.testing.assert_close(out.lm_loss, ref, rtol=1e-6, atol=1e-6)


def test_chunked_target_prob_ignores_padding_rows():
    torch.manual_seed(0)
    h, w = torch.randn(10, 8), torch.randn(32, 8)
    target = torch.randint(0, 20, (10,))
    dense = (h @ w[:20].t()).softmax(-1).gather(-1, target[:, None]).squeeze(-1)
    got = chunked_target_prob(h, w, target, chunk_rows=3, chunk_vocab=7, vocab_size=20)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-6)


def test_prob_readout_gradient_is_finite_when_an_exit_mass_underflows():
    """A router saturated at g = 1 gives an executed step exit mass 0; the loss must stay finite."""
    torch.manual_seed(0)
    cfg = _cfg(latent_readout="prob")
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("latent.routers") and name.endswith("bias"):
                p.fill_(200.0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(tokens, labels=torch.randint(0, cfg.vocab_size, (2, 16)))
    assert float(out.exit_mass[..., 0].detach().max()) == 0.0           # step 0 ran with exit mass 0
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
