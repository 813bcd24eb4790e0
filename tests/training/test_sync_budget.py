"""Host-sync budget (utils/sync_counter.py): the laps and the training step read the device a fixed
small number of times, whatever the sequence length and batch size.

Budget:
* forward of one micro-batch: one sync per router decision that runs (a lap k < ℓmax ends with
  one read of [continuing tokens, largest row count, penalised tokens]); lap 0's compaction
  sizes are known on the host, later laps get theirs from that read; the last lap, the loss and
  the backward add none. So L laps cost min(L, ℓmax) syncs.
* training step: those, plus one copy of ``num_steps`` per micro-batch for the FLOPs meter, plus
  ``STEP_OVERHEAD`` per step (the statistics read once, the gradient norm and finite checks of
  the optimizer).
"""
import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes

from megatron_alcot.arguments import parse_args
from megatron_alcot.model import build_model
from megatron_alcot.model.presets import preset
from megatron_alcot.training import train as train_module
from megatron_alcot.training.flops_meter import FlopsMeter
from megatron_alcot.utils.sync_counter import SyncCounter

from _tiny import tiny_argv

STEP_OVERHEAD = 3        # the statistics read once + the optimizer's gradient-norm and finite checks
REAL_TRAIN_STEP = train_module.train_step
REAL_FLOPS = FlopsMeter.micro_batch_flops


def test_counter_sees_the_usual_suspects():
    x = torch.randn(4, 5)
    m = x > 0
    cases = [lambda: x.sum().item(), lambda: bool(m.any()), lambda: m.nonzero(), lambda: x[m],
             lambda: x.clone().__setitem__(m, 0.0), lambda: torch.bincount(m.long().reshape(-1)),
             lambda: x.sum(1).tolist(), lambda: torch.unique(m),
             lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3]))]
    for fn in cases:
        with SyncCounter() as s:
            fn()
        assert s.total == 1, s.by_op
    with SyncCounter() as s:
        torch.where(m, x, 0.0).amax()
        x.reshape(-1).nonzero_static(size=3)
        x.index_select(0, torch.tensor([0, 2]))
    assert s.total == 0, s.by_op


@pytest.mark.parametrize("method", ["alcot", "vanilla", "loop", "ponder"])
def test_forward_backward_syncs_per_lap(method):
    counts = set()
    for b, s in ((2, 16), (3, 48)):
        cfg = preset("tiny", latent_method=method, latent_max_steps=3, seq_length=s,
                     latent_threshold=0.2, latent_loss_weight=0.1,
                     untie_embeddings_and_output_weights=True)
        model = build_model(cfg)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 256, (b, s), generator=g)
        labels = torch.randint(0, 256, (b, s), generator=g)
        kw = {}
        if method == "alcot":     # uneven rows: every lap compacts
            kw["halting"] = lambda k, r, active: (torch.arange(s) % (k + 2) != 0).expand_as(active)
        with SyncCounter() as syncs:
            out = model(tokens, labels=labels, **kw)
            out.loss.backward()
        laps = int(out.lap_executed.any(-1).any(-1).sum()) if method == "alcot" else None
        if method == "alcot":
            assert laps == 4 and syncs.total == min(laps, 3), syncs.by_op
        else:
            assert syncs.total == 0, syncs.by_op
        counts.add(syncs.total)
    assert len(counts) == 1          # independent of batch size and sequence length


def _iteration_syncs(monkeypatch, **flags):
    per_iteration = []
    real_step, real_flops = REAL_TRAIN_STEP, REAL_FLOPS

    def counted_step(*args, **kwargs):
        with SyncCounter() as syncs:
            FlopsMeter._counter_for_test = syncs
            stats = real_step(*args, **kwargs)
        per_iteration.append(syncs.total)
        return stats

    def host_flops(self, num_steps):
        # The meter works on a host copy of num_steps: one device copy on GPUs; the CPU-side
        # arithmetic after it is no sync.
        FlopsMeter._counter_for_test._count("device copy")
        with _disable_current_modes():
            return real_flops(self, num_steps)

    monkeypatch.setattr(train_module, "train_step", counted_step)
    monkeypatch.setattr(FlopsMeter, "micro_batch_flops", host_flops)
    train_module.train(parse_args(tiny_argv(train_iters=2, save=False, latent_threshold=0.5, **flags)))
    return per_iteration


@pytest.mark.slow
def test_training_iteration_budget(monkeypatch):
    """2 laps' router decisions (ℓmax 2, g at init 0.9 > τ: every token continues) per micro-batch,
    one FLOPs copy per micro-batch, STEP_OVERHEAD per step; the same at two sequence lengths and
    batch sizes."""
    micro = 8 // 2                       # global batch 8, micro-batch 2, one DP rank
    short = _iteration_syncs(monkeypatch, seq_length=32, micro_batch_size=2)
    long = _iteration_syncs(monkeypatch, seq_length=64, micro_batch_size=4, global_batch_size=16)
    assert short == [micro * (2 + 1) + STEP_OVERHEAD] * 2, short
    assert long == short, (short, long)
