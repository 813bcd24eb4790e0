"""Black box: a --bf16 training run routes in fp32 (g at init is the configured 0.9)."""
import torch

from megatron_alcot.arguments import parse_args
from megatron_alcot.training.train import train

from _tiny import tiny_argv


def test_bf16_training_run_starts_at_init_prob():
    """Black box: a --bf16 training run's first forward has g = 0.9 to fp32 precision."""
    seen = []

    def hook(model):
        def record(_module, _args, _kwargs, output):
            if not seen:
                seen.append(output.continue_prob.detach().clone())

        model.register_forward_hook(record, with_kwargs=True)

    train(parse_args(tiny_argv(train_iters=1, bf16=None, latent_max_steps=2, save=False,
                    untie_embeddings_and_output_weights=None)), on_model_built=hook)
    g = seen[0]
    first = g[..., 0]
    assert (first.double() - 0.9).abs().max() <= torch.finfo(torch.float32).eps
    assert (first.double() - 0.90234375).abs().min() > 1e-3     # not bf16's value
