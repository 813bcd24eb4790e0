"""Every data-parallel wrapper keeps the one gradient-sync interface (``optim/grad_sync.py``) and
does what the trainer relies on: ``zero_grad_buffer`` discards what earlier backward passes left in
the gradients the optimizer reads (a step after a discarded one equals the same step on a fresh
twin, bit for bit), ``no_sync`` keeps gradients local until the last micro-batch and
``finish_grad_sync`` reduces them. DeepSpeed's engine refuses both calls inside an accumulation.
"""
import contextlib
import io

import pytest
import torch

from dist_utils import run_distributed, run_distributed_hard_exit
from megatron_alcot.config import OptimizerConfig
from megatron_alcot.model import build_model
from megatron_alcot.model.presets import preset
from megatron_alcot.optim import build_optimizer
from megatron_alcot.optim.distributed_optimizer import build_distributed_optimizer
from megatron_alcot.optim.grad_sync import GradSyncModel
from megatron_alcot.parallel import parallel_state
from megatron_alcot.training.ddp import DistributedDataParallel

BATCH, SEQ, VOCAB = 4, 16, 256
OPTIM = OptimizerConfig(lr=1e-2, min_lr=1e-3, weight_decay=0.1, clip_grad=0.3)
KINDS = ("ddp", "zero1", "zero2")


def _cfg():
    return preset("tiny", seq_length=SEQ, untie_embeddings_and_output_weights=False)


def _batch(seed, rows=BATCH):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (rows, SEQ), generator=g),
            torch.randint(0, VOCAB, (rows, SEQ), generator=g))


def _wrap(kind, model):
    if kind == "ddp":
        return (DistributedDataParallel(model, parallel_state.get_data_parallel_group()),
                build_optimizer(model, OPTIM))
    opt = build_distributed_optimizer(model, OPTIM, zero_stage=int(kind[-1]))
    return opt.wrap_model(model), opt


def _step(wrapped, opt, micro_batches):
    """The trainer's order: zero, all but the last micro-batch under no_sync, finish, step."""
    wrapped.zero_grad_buffer()
    for i, (tokens, labels) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else wrapped.no_sync():
            (wrapped(tokens, labels=labels).loss / len(micro_batches)).backward()
    wrapped.finish_grad_sync()
    assert opt.step().updated


def _discarded_then_step(kind, rank=0):
    """Parameters after one step on a model whose buffer first held a reduced, large gradient of
    other data, and after the same step on a fresh twin."""
    models = [build_model(_cfg()), build_model(_cfg())]
    real = [_batch(10 + 2 * rank), _batch(11 + 2 * rank)]
    dirty, dirty_opt = _wrap(kind, models[0])
    clean, clean_opt = _wrap(kind, models[1])
    assert isinstance(dirty, GradSyncModel)
    dirty.zero_grad_buffer()
    tokens, labels = _batch(99 + rank)
    (dirty(tokens, labels=labels).loss * 100).backward()
    dirty.finish_grad_sync()             # the reduced gradient sits where the optimizer reads it
    _step(dirty, dirty_opt, real)
    _step(clean, clean_opt, real)
    return [(a.detach().clone(), b.detach().clone())
            for a, b in zip(models[0].parameters(), models[1].parameters())]


@pytest.mark.parametrize("kind", KINDS)
def test_zero_grad_buffer_discards_earlier_gradients_one_process(kind):
    for dirty, clean in _discarded_then_step(kind):
        assert torch.equal(dirty, clean)


def _dp2_body(rank, world):
    parallel_state.initialize_model_parallel(1, 1)
    out = {}
    for kind in KINDS:
        out[kind] = all(torch.equal(a, b) for a, b in _discarded_then_step(kind, rank))
    # no_sync: after a micro-batch under it the buffer holds this rank's own gradient, unreduced.
    for kind in ("ddp", "zero1"):
        model, local = build_model(_cfg()), build_model(_cfg())
        wrapped, _ = _wrap(kind, model)
        wrapped.zero_grad_buffer()
        tokens, labels = _batch(20 + rank, BATCH // world)
        with wrapped.no_sync():
            wrapped(tokens, labels=labels).loss.backward()
        local(tokens, labels=labels).loss.backward()
        out[f"{kind}_local"] = all(torch.equal(a.grad, b.grad)
                                   for a, b in zip(model.parameters(), local.parameters()))
        wrapped.finish_grad_sync()
        out[f"{kind}_grads"] = {n: p.grad.clone() for n, p in model.named_parameters()} \
            if kind == "ddp" else None
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


@pytest.mark.slow
def test_wrappers_at_dp2_zero_accumulate_locally_and_reduce():
    outs = [torch.load(io.BytesIO(b), weights_only=True) for b in run_distributed(_dp2_body, 2)]
    for out in outs:
        for kind in KINDS:
            assert out[kind], f"{kind}: a step after zero_grad_buffer differs from a fresh twin's"
        assert out["ddp_local"] and out["zero1_local"], "no_sync reduced the gradients"
    for name, grad in outs[0]["ddp_grads"].items():      # finish_grad_sync: the same average
        assert torch.equal(grad, outs[1]["ddp_grads"][name]), name


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Embedding(VOCAB, 32)
        self.fc = torch.nn.Linear(32, VOCAB)

    def forward(self, tokens, labels):
        logits = self.fc(self.embed(tokens))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def _deepspeed_body(rank, world):  # noqa: ARG001
    from megatron_alcot.optim.deepspeed_glue import DeepSpeedModel, initialize_deepspeed
    out = {}
    for stage in (1, 2):
        engine, _ = initialize_deepspeed(
            _Mlp(), None, {"steps_per_print": 10 ** 9}, lr=OPTIM.lr, weight_decay=OPTIM.weight_decay,
            micro_batch_size=BATCH, global_batch_size=2 * BATCH, zero_stage=stage)
        model = DeepSpeedModel(engine)
        row = {"protocol": isinstance(model, GradSyncModel)}
        model.zero_grad_buffer()
        for i in range(2):
            with model.no_sync():
                engine.backward(model(*_batch(30 + i)))
            engine.step()
            if i == 0:                  # in the middle of DeepSpeed's accumulation: refused
                for call in (model.zero_grad_buffer, model.finish_grad_sync):
                    try:
                        call()
                        row[call.__name__] = "accepted"
                    except RuntimeError as exc:
                        row[call.__name__] = str(exc)
        model.finish_grad_sync()
        model.zero_grad_buffer()
        row["no_grad_left"] = all(p.grad is None for p in engine.module.parameters())
        row["stepped"] = engine.global_steps == 1
        out[stage] = row
    return out


@pytest.mark.slow
def test_deepspeed_model_holds_the_interface_at_its_accumulation_boundary():
    pytest.importorskip("deepspeed")
    (out,) = run_distributed_hard_exit(_deepspeed_body, 1, env={"DS_ACCELERATOR": "cpu"}, timeout=180)
    for stage, row in out.items():
        assert row["protocol"] and row["no_grad_left"] and row["stepped"], (stage, row)
        for call in ("zero_grad_buffer", "finish_grad_sync"):
            assert "1 of 2 micro-batches" in row[call], (stage, call, row[call])
