"""Text generation with the (layer, lap) KV cache, reporting the latent steps of every token.

    from megatron_alcot.model.generation import generate
    res = generate(model, prompt_ids, max_new_tokens=20)                       # greedy
    res = generate(model, prompt_ids, 20, greedy=False, temperature=0.8, top_k=40, top_p=0.9, seed=0, eos_id=2)
    res = generate(model, prompt_ids, 64, stop=lambda new: new.shape[1] >= 3)   # stop(new [b, n]) -> bool
    res.tokens            # [b, prompt + new] prompt followed by the generated ids
    res.new_tokens        # [b, new]
    res.latent_steps      # [b, new] ℓ of the position whose readout produced each new token (-1 after EOS)
    res.prompt_latent_steps   # [b, prompt] ℓ_t of the prompt tokens
    res.cache             # the LatentKVCache (cache.num_entries() == Σ_t (1+ℓ_t) at batch size 1)

Every method decodes incrementally (``kv_cache.decode``): the prompt is one parallel pass whose
per-lap keys/values fill the cache, then each new token runs its laps against the cache. A new
token x_{t+1} is chosen from the readout at position t, which ran ``ℓ_t`` latent steps: that is the
count reported for x_{t+1}. ``use_cache=False`` instead re-runs the parallel forward on the whole
growing sequence each step (the reference the cache is tested against).

Batches are rows of equal prompt length (no padding). Rows that emitted ``eos_id`` keep emitting
it (latent steps -1) until every row has finished, ``stop(new_tokens)`` returns True (checked after
each token, e.g. a stop string was produced) or ``max_new_tokens`` is reached.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_alcot.model.kv_cache import LatentKVCache, decode
from megatron_alcot.parallel.tensor_parallel import mappings


@dataclass
class GenerationResult:
    tokens: torch.Tensor                  # [b, prompt + new]
    new_tokens: torch.Tensor              # [b, new]
    latent_steps: torch.Tensor            # [b, new] int64, -1 once the row has finished
    prompt_latent_steps: torch.Tensor     # [b, prompt] int64
    cache: Optional[LatentKVCache] = None


def next_token_logits(logits_parallel: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Vocab-parallel ``[b, V_padded/tp]`` -> full fp32 ``[b, vocab_size]`` (padding dropped)."""
    return mappings.gather_from_tensor_model_parallel_region(logits_parallel.float())[..., :vocab_size]


def sample(logits: torch.Tensor, greedy: bool = True, temperature: float = 1.0,
           top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
           top_p: float = 1.0) -> torch.Tensor:
    """``[b, V]`` -> ``[b]`` ids: argmax, or a draw from softmax(logits / T) over the top k ids,
    then over the smallest set of them whose probability reaches ``top_p`` (nucleus)."""
    if greedy:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (probs.cumsum(-1) - probs) > top_p           # the top token is always kept
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, greedy: bool = True, temperature: float = 1.0,
             top_k: Optional[int] = None, eos_id: Optional[int] = None, seed: Optional[int] = None,
             halting="learned", use_cache: bool = True, top_p: float = 1.0,
             stop: Optional[Callable[[torch.Tensor], bool]] = None) -> GenerationResult:
    """Generate ``max_new_tokens`` after ``prompt_ids`` (``[s]`` or ``[b, s]``, equal lengths)."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.int64)
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a non-empty [s] or [b, s] id tensor, got shape "
                         f"{tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    vocab = model.config.vocab_size
    if int(prompt.min()) < 0 or int(prompt.max()) >= vocab:
        raise ValueError(f"prompt ids must lie in [0, {vocab}) (the model's vocabulary)")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        prompt = prompt.to(device)
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device).manual_seed(seed)
        cache = LatentKVCache() if use_cache else None
        seq = prompt
        b = prompt.shape[0]
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        new, steps = [], []
        out = decode(model, cache, prompt, halting) if use_cache else model(prompt, halting=halting)
        prompt_steps = out.num_steps
        for i in range(max_new_tokens):
            if i > 0:
                out = (decode(model, cache, seq[:, -1:], halting) if use_cache
                       else model(seq, halting=halting))
            logits = next_token_logits(out.logits[:, -1], vocab)
            token = sample(logits, greedy, temperature, top_k, gen, top_p)
            ell = out.num_steps[:, -1]
            if eos_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_id), token)
                ell = torch.where(finished, torch.full_like(ell, -1), ell)
                finished = finished | (token == eos_id)
            new.append(token)
            steps.append(ell)
            seq = torch.cat([seq, token[:, None]], dim=1)
            if eos_id is not None and bool(finished.all()):
                break
            if stop is not None and stop(torch.stack(new, 1)):
                break
        empty = prompt.new_zeros(b, 0)
        return GenerationResult(
            tokens=seq, new_tokens=torch.stack(new, 1) if new else empty,
            latent_steps=torch.stack(steps, 1) if steps else empty,
            prompt_latent_steps=prompt_steps, cache=cache)
    finally:
        model.train(was_training)
