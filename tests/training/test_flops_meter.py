"""The trainer's FLOPs meter is model.flops.training_flops itself, for ALCoT and every baseline."""
import pytest
import torch

from megatron_alcot.model import flops
from megatron_alcot.model.presets import preset
from megatron_alcot.training.flops_meter import FlopsMeter


@pytest.mark.parametrize("method", ["vanilla", "alcot", "loop", "pause", "ponder"])
def test_meter_is_the_model_formula(method):
    cfg = preset("tiny", latent_method=method, latent_max_steps=3, untie_embeddings_and_output_weights=True)
    steps = torch.tensor([[0, 1, 3, 2, 0, 3], [3, 3, 0, 1, 1, 2]])
    if method != "alcot":
        steps = torch.full_like(steps, cfg.max_latent_steps)
    expected = flops.training_flops(cfg, steps)
    assert expected > 0
    assert FlopsMeter(cfg).micro_batch_flops(steps) == expected


def test_tflops_and_mfu():
    assert FlopsMeter.tflops_per_device(6e12, 2.0, 3) == pytest.approx(1.0)
    assert FlopsMeter.tflops_per_device(1.0, 0.0, 1) == 0.0
    assert FlopsMeter.mfu(0.5, 2.0) == pytest.approx(0.25)
    assert FlopsMeter.mfu(0.5, None) is None
