"""Learning sanity: a tiny ALCoT model trained ~100 AdamW steps on real English text (the stdlib's
``pydoc_data.topics``, bytes as tokens) clearly lowers its held-out loss, and its routers learn."""
import pydoc_data.topics
import pytest
import torch

from megatron_alcot.model import build_model
from megatron_alcot.model.presets import preset

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SEQ, BATCH, STEPS = 64, 8, 100


def byte_text() -> torch.Tensor:
    topics = pydoc_data.topics.topics
    return torch.tensor(list("".join(topics[k] for k in sorted(topics)).encode()), dtype=torch.int64)


def windows(data, starts):
    seq = torch.stack([data[i:i + SEQ + 1] for i in starts.tolist()])
    return seq[:, :-1], seq[:, 1:]


@torch.no_grad()
def eval_loss(model, tokens, labels):
    model.eval()
    loss = model(tokens, labels=labels).lm_loss.item()
    model.train()
    return loss


def test_tiny_alcot_learns_real_text():
    torch.manual_seed(0)
    data = byte_text()
    split = int(0.9 * len(data))
    g = torch.Generator().manual_seed(0)
    held_out = windows(data[split:], torch.randint(0, len(data) - split - SEQ - 1, (16,), generator=g))
    cfg = preset("tiny", latent_max_steps=2, seq_length=SEQ, latent_loss_weight=0.1)
    model = build_model(cfg)
    routers = [r.bias.detach().clone() for r in model.latent.routers]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 10))
    before = eval_loss(model, *held_out)
    losses = []
    for _ in range(STEPS):
        tokens, labels = windows(data, torch.randint(0, split - SEQ - 1, (BATCH,), generator=g))
        out = model(tokens, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.lm_loss.item())
    after = eval_loss(model, *held_out)
    assert before > 5.0                          # about ln 256 at init
    assert after < before - 2.0, (before, after)  # bytes of English text: ~2.5 nats after 100 steps
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 2.0
    assert all(not torch.equal(a, r.bias) for a, r in zip(routers, model.latent.routers))
