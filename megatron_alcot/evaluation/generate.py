"""Generate text and show how many latent steps each generated token used.

    python tools/generate.py --load ckpts/ --prompt "The quick brown" --max-new-tokens 20 --greedy
    python tools/generate.py --hf hf_out/ --prompt "..." --max-new-tokens 20 --temperature 0.8 --top-k 40 --seed 0
    python tools/generate.py --load ckpts/ --prompt "..." --max-new-tokens 20 --json

Text mode prints the prompt, then each generated token as ``piece[ℓ]`` (ℓ = latent steps of the
position that predicted it: 0 = answered at once, ℓmax = thought the longest), then a legend and
the mean. ``--json`` prints ``{"prompt", "text", "tokens": [{"id", "piece", "latent_steps"}],
"mean_latent_steps", "histogram"}``. Native checkpoints decode on the (layer, lap) KV cache
(``megatron_alcot.model.generation.generate``; ``--no-cache`` re-runs the parallel forward per token
instead, the exact reference); exports use their own ``generate()`` with its KV cache.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def run_native(args):
    from megatron_alcot.evaluation import generate_tokens
    from megatron_alcot.evaluation.perplexity import load_native_model, native_tokenizer
    model, cfg, meta = load_native_model(args.load, args.iteration)
    tok = native_tokenizer(meta, args.tokenizer_model)
    if tok is None:
        raise ValueError("the checkpoint names no tokenizer; pass --tokenizer-model")
    prompt = tok.tokenize(args.prompt)
    ids, steps = generate_tokens(model, prompt, args.max_new_tokens,
                                 temperature=0.0 if args.greedy else args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, eos=tok.eod, seed=args.seed,
                                 use_cache=not args.no_cache)
    pieces = [tok.detokenize([i]) for i in ids]
    return ids, steps, pieces, tok.detokenize(ids), cfg.max_latent_steps


def run_hf(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_alcot.hf import export_max_latent_steps
    model = AutoModelForCausalLM.from_pretrained(args.hf, trust_remote_code=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.hf, trust_remote_code=True)
    prompt = tok(args.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sample = not args.greedy and args.temperature > 0
    out = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=sample,
                         temperature=args.temperature if sample else None, top_k=args.top_k if sample else None,
                         top_p=args.top_p if sample else None, return_dict_in_generate=True,
                         eos_token_id=model.config.eos_token_id, pad_token_id=model.config.eos_token_id)
    ids = out.sequences[0, prompt.shape[1]:].tolist()
    steps = getattr(out, "latent_steps", None)
    steps = steps[0].tolist() if steps is not None else [0] * len(ids)
    pieces = [tok.decode([i]) for i in ids]
    return ids, steps, pieces, tok.decode(ids), export_max_latent_steps(model.config)


def render(prompt, ids, steps, pieces, text, max_latent_steps, as_json: bool) -> str:
    hist = [0] * (max(steps + [max_latent_steps]) + 1)
    for s in steps:
        hist[max(s, 0)] += 1
    mean = sum(steps) / len(steps) if steps else 0.0
    if as_json:
        return json.dumps({"prompt": prompt, "text": text, "mean_latent_steps": mean,
                           "histogram": {str(k): c for k, c in enumerate(hist)},
                           "tokens": [{"id": i, "piece": p, "latent_steps": s}
                                      for i, p, s in zip(ids, pieces, steps)]}, indent=2, ensure_ascii=False)
    marked = "".join(f"{p}[{s}]" for p, s in zip(pieces, steps))
    return (f"{prompt}{text}\n\n{prompt}{marked}\n\n"
            f"legend: piece[ℓ] = the token was emitted after ℓ latent steps (0..{max_latent_steps}); "
            f"mean {mean:.2f}; histogram {dict(enumerate(hist))}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="native checkpoint directory")
    src.add_argument("--hf", help="Hugging Face export directory")
    p.add_argument("--iteration", type=int, default=None)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default when --temperature is 0)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--no-cache", action="store_true",
                   help="native: re-run the parallel forward for every token instead of the KV cache (reference)")
    p.add_argument("--json", action="store_true", help="print JSON instead of marked-up text")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        print("error: --max-new-tokens must be >= 1", file=sys.stderr)
        return 1
    try:
        ids, steps, pieces, text, max_latent_steps = run_hf(args) if args.hf else run_native(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(render(args.prompt, ids, steps, pieces, text, max_latent_steps, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
