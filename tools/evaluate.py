"""Perplexity, mean latent steps per token and the depth histogram of a model, as JSON.

    python tools/evaluate.py --load ckpts/ --input held_out.jsonl [--seq-length 2048] [--output r.json]
    python tools/evaluate.py --hf hf_out/ --input held_out.jsonl
    python tools/evaluate.py --load ckpts/ --data-path data/corpus_text_document [--max-documents 1000]

``--input``: JSON Lines with a ``text`` field (``--json-key``), tokenised with the checkpoint's
tokenizer (``--tokenizer-model`` overrides) or the export's; adds word/byte perplexity.
``--data-path``: a Megatron ``.bin/.idx`` prefix; each stored document is scored (token level).
Windows: the rolling scheme of ``megatron_alcot/evaluation/perplexity.py`` (lm-eval's
``loglikelihood_rolling``), ``--seq-length`` tokens (default: the model's max positions), each
document preceded by ``--prefix-token`` (default EOD, as in packed training data).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_jsonl(path: str, key: str, limit=None):
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)[key])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object with a {key!r} string ({e}); "
                                 "fix the line or choose --json-key") from None
            if limit and len(texts) >= limit:
                break
    return texts


def build_scorer(args):
    """(scorer, tokenize function or None, default window)."""
    from megatron_alcot.evaluation.perplexity import HFScorer, NativeScorer, native_tokenizer
    if args.hf:
        scorer = HFScorer.from_pretrained(args.hf)
        tokenize = None
        if args.input:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(args.hf, trust_remote_code=True)

            def tokenize(text):
                return tok(text, add_special_tokens=False)["input_ids"]
        return scorer, tokenize, int(scorer.model.config.max_position_embeddings)
    from megatron_alcot.evaluation.perplexity import load_native_model
    model, cfg, meta = load_native_model(args.load, args.iteration)
    tok = native_tokenizer(meta, args.tokenizer_model)
    scorer = NativeScorer(model, cfg, eod=tok.eod if tok else None, bos=tok.bos if tok else None)
    if args.input and tok is None:
        raise ValueError("the checkpoint names no tokenizer; pass --tokenizer-model")
    return scorer, (tok.tokenize if tok else None), cfg.max_positions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="native checkpoint directory")
    src.add_argument("--hf", help="Hugging Face export directory")
    p.add_argument("--iteration", type=int, default=None)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--input", help="JSON Lines file with one document per line")
    data.add_argument("--data-path", help="Megatron .bin/.idx prefix")
    p.add_argument("--json-key", default="text")
    p.add_argument("--seq-length", type=int, default=None, help="window length (default: max positions)")
    p.add_argument("--prefix-token", type=int, default=None, help="token before each document (default EOD)")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--output", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    from megatron_alcot.evaluation.perplexity import evaluate_token_documents
    try:
        scorer, tokenize, max_pos = build_scorer(args)
        window = args.seq_length or max_pos
        if args.input:
            texts = read_jsonl(args.input, args.json_key, args.max_documents)
            docs = [tokenize(t) for t in texts]
        else:
            from megatron_alcot.data.indexed_dataset import IndexedDataset
            ds = IndexedDataset(args.data_path)
            n = len(ds) if args.max_documents is None else min(len(ds), args.max_documents)
            docs, texts = [[int(t) for t in ds[i]] for i in range(n)], None
        result = evaluate_token_documents(scorer, docs, window, args.prefix_token, texts)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result["model"] = os.path.abspath(args.hf or args.load)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
