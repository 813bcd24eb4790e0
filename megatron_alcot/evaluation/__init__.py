"""Evaluation: perplexity and latent-step statistics (``perplexity.py``), an lm-evaluation-harness
adapter for native checkpoints (``lm_eval_adapter.py``), and decoding for the tools.

    from megatron_alcot.evaluation import generate_tokens
    new_ids, steps = generate_tokens(scorer, prompt_ids, max_new_tokens=20)           # greedy
    new_ids, steps = generate_tokens(scorer, prompt_ids, 20, temperature=0.8, top_k=40, seed=0)

``generate_tokens`` works on any :class:`perplexity.Scorer` (native or HF). It re-runs the parallel
forward over the whole sequence for every new token, which by the 2-D mask equals cached
token-by-token decoding (DESIGN §2); ``steps[i]`` is ℓ of the position that predicted token i.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


@torch.no_grad()
def generate_tokens(scorer, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, eos: Optional[int] = None, seed: Optional[int] = None,
                    stop=None):
    """(generated ids, latent steps per generated id); ``temperature == 0`` is greedy.

    ``stop(ids_so_far) -> bool`` ends decoding early (e.g. a stop string was produced).
    """
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    seq, out, steps = list(prompt), [], []
    for _ in range(int(max_new_tokens)):
        logp, st = scorer.forward(torch.tensor([seq], dtype=torch.long))
        logits = logp[0, -1]
        if temperature and temperature > 0:
            logits = logits / temperature
            if top_k and top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if top_p < 1.0:
                sorted_l, order = torch.sort(logits, descending=True)
                probs = torch.softmax(sorted_l, -1)
                drop = (probs.cumsum(-1) - probs) > top_p
                logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        else:
            nxt = int(logits.argmax())
        out.append(nxt)
        steps.append(int(st[0, -1]))
        seq.append(nxt)
        if (eos is not None and nxt == eos) or (stop is not None and stop(out)):
            break
    return out, steps
