"""Evaluation: perplexity and latent-step statistics (``perplexity.py``), an lm-evaluation-harness
adapter for native checkpoints (``lm_eval_adapter.py``), and decoding for the tools.

    from megatron_alcot.evaluation import generate_tokens
    new_ids, steps = generate_tokens(scorer, prompt_ids, max_new_tokens=20)           # greedy
    new_ids, steps = generate_tokens(scorer, prompt_ids, 20, temperature=0.8, top_k=40, seed=0)
    new_ids, steps = generate_tokens(model, prompt_ids, 20, eos=2, stop=lambda ids: ids[-1] == 13)

``generate_tokens`` decodes one prompt with a native model (a :class:`perplexity.NativeScorer` or
the model itself) through :func:`megatron_alcot.model.generation.generate`: the prompt is one
parallel pass that fills the (layer, lap) KV cache, then every new token runs its latent steps
against the cache, which equals re-running the parallel forward (docs/method.md §8; ``use_cache=False``
does that, as a reference). ``steps[i]`` is ℓ of the position that predicted token i. Exports
decode with their own ``model.generate()`` (``tools/generate.py --hf``).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch


def generate_tokens(scorer, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, eos: Optional[int] = None, seed: Optional[int] = None,
                    stop: Optional[Callable[[List[int]], bool]] = None,
                    use_cache: bool = True) -> Tuple[List[int], List[int]]:
    """(generated ids, latent steps per generated id); ``temperature == 0`` is greedy.

    Decoding ends after ``eos``, when ``stop(ids_so_far)`` returns True (e.g. a stop string was
    produced) or after ``max_new_tokens``.
    """
    from megatron_alcot.evaluation.perplexity import NativeScorer
    from megatron_alcot.model.generation import generate
    from megatron_alcot.model.llama import LlamaModel
    model = scorer.model if isinstance(scorer, NativeScorer) else scorer
    if not isinstance(model, LlamaModel):
        raise TypeError(f"generate_tokens needs a native model or NativeScorer, got {type(scorer).__name__}; "
                        "decode a Hugging Face export with its model.generate()")
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    sampling = bool(temperature and temperature > 0)
    res = generate(model, torch.tensor([list(prompt)], dtype=torch.int64), int(max_new_tokens),
                   greedy=not sampling, temperature=temperature if sampling else 1.0,
                   top_k=top_k if top_k and top_k > 0 else None, top_p=top_p if sampling else 1.0,
                   eos_id=eos, seed=seed, use_cache=use_cache,
                   stop=(lambda new: stop(new[0].tolist())) if stop is not None else None)
    return res.new_tokens[0].tolist(), res.latent_steps[0].tolist()
