"""Perplexity, mean latent steps per token and the depth histogram of a model, as JSON.

    python tools/evaluate.py --load ckpts/ --input held_out.jsonl [--seq-length 2048] [--output r.json]
    python tools/evaluate.py --hf hf_out/ --input held_out.jsonl
    python tools/evaluate.py --load ckpts/ --data-path data/corpus_text_document [--max-documents 1000]
    python tools/evaluate.py --load ckpts/ --data-path data/corpus_text_document --split 969,30,1  # held out

    from megatron_alcot.evaluation.evaluate import evaluate
    result = evaluate(load="ckpts/", input="held_out.jsonl")

``--input``: JSON Lines with a ``text`` field (``--json-key``), tokenised with the checkpoint's
tokenizer (``--tokenizer-model`` overrides) or the export's; adds word/byte perplexity.
``--data-path``: a Megatron ``.bin/.idx`` prefix; each stored document is scored (token level), or
with ``--split`` only the documents of ``--split-name`` (default valid), the trainer's document split.
Windows: the rolling scheme of ``megatron_alcot/evaluation/perplexity.py`` (lm-eval's
``loglikelihood_rolling``), ``--seq-length`` tokens (default: the model's max positions), each
document preceded by ``--prefix-token`` (default EOD, as in packed training data).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


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


def build_scorer(load=None, hf=None, iteration=None, tokenizer_model=None, need_tokenizer=False):
    """(scorer, tokenize function or None, default window) of a native checkpoint or an export."""
    from megatron_alcot.evaluation.perplexity import HFScorer, NativeScorer, load_native_model, native_tokenizer
    if hf:
        scorer = HFScorer.from_pretrained(hf)
        tok = None
        if need_tokenizer:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(hf, trust_remote_code=True)

        def hf_tokenize(text):
            return tok(text, add_special_tokens=False)["input_ids"]
        return scorer, hf_tokenize if tok else None, int(scorer.model.config.max_position_embeddings)
    model, cfg, meta = load_native_model(load, iteration)
    tok = native_tokenizer(meta, tokenizer_model)
    scorer = NativeScorer(model, cfg, eod=tok.eod if tok else None, bos=tok.bos if tok else None)
    if need_tokenizer and tok is None:
        raise ValueError("the checkpoint names no tokenizer; pass --tokenizer-model")
    return scorer, (tok.tokenize if tok else None), cfg.max_positions


def split_documents(data_path: str, split=None, split_name: str = "valid", max_documents=None):
    """(documents as id lists, ``[beg, end)``) of a ``.bin/.idx`` prefix: all of them, or the range
    ``--split`` gives ``split_name`` (Megatron's document split, as the trainer's ``--split``)."""
    from megatron_alcot.data.indexed_dataset import IndexedDataset
    ds = IndexedDataset(data_path)
    beg, end = 0, len(ds)
    if split is not None:
        from megatron_alcot.data.utils import split_matrix, split_range
        names = ("train", "valid", "test")
        if split_name not in names:
            raise ValueError(f"--split-name {split_name!r}: use one of {', '.join(names)}")
        bookends = split_matrix(split)[names.index(split_name)]
        if bookends is None:
            raise ValueError(f"--split {split} gives the {split_name} split no documents")
        beg, end = split_range(bookends, len(ds))
    if max_documents is not None:
        end = min(end, beg + max_documents)
    return [[int(t) for t in ds[i]] for i in range(beg, end)], (beg, end)


def evaluate(load=None, hf=None, *, input=None, data_path=None, split=None, split_name="valid",
             iteration=None, seq_length=None, prefix_token=None, tokenizer_model=None,
             json_key="text", max_documents=None) -> dict:
    """The JSON result of ``tools/evaluate.py`` as a dict (the command line calls this).

        evaluate(load="ckpts", data_path="data/corpus_text_document", split="95,5,0")   # held-out split
        evaluate(hf="hf_out", input="held_out.jsonl", seq_length=2048)

    Exactly one of ``load``/``hf`` and one of ``input``/``data_path``. Raises ValueError/OSError
    with what to fix."""
    if (load is None) == (hf is None):
        raise ValueError("give exactly one of load= (native checkpoint) and hf= (export)")
    if (input is None) == (data_path is None):
        raise ValueError("give exactly one of input= (JSON Lines) and data_path= (.bin/.idx prefix)")
    if split is not None and data_path is None:
        raise ValueError("--split selects documents of a --data-path; it does not apply to --input")
    from megatron_alcot.evaluation.perplexity import evaluate_token_documents
    scorer, tokenize, max_pos = build_scorer(load, hf, iteration, tokenizer_model, need_tokenizer=bool(input))
    window = seq_length or max_pos
    extra = {}
    if input:
        texts = read_jsonl(input, json_key, max_documents)
        docs = [tokenize(t) for t in texts]
    else:
        docs, (beg, end) = split_documents(data_path, split, split_name, max_documents)
        texts = None
        if split is not None:
            extra = {"split": split, "split_name": split_name, "document_range": [beg, end]}
    result = evaluate_token_documents(scorer, docs, window, prefix_token, texts)
    result.update(extra)
    result["model"] = os.path.abspath(hf or load)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="native checkpoint directory")
    src.add_argument("--hf", help="Hugging Face export directory")
    p.add_argument("--iteration", type=int, default=None)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--input", help="JSON Lines file with one document per line")
    data.add_argument("--data-path", help="Megatron .bin/.idx prefix")
    p.add_argument("--split", default=None,
                   help="with --data-path: score only the documents this split (e.g. 969,30,1) gives --split-name")
    p.add_argument("--split-name", default="valid", choices=["train", "valid", "test"])
    p.add_argument("--json-key", default="text")
    p.add_argument("--seq-length", type=int, default=None, help="window length (default: max positions)")
    p.add_argument("--prefix-token", type=int, default=None, help="token before each document (default EOD)")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--output", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    try:
        result = evaluate(args.load, args.hf, input=args.input, data_path=args.data_path, split=args.split,
                          split_name=args.split_name, iteration=args.iteration, seq_length=args.seq_length,
                          prefix_token=args.prefix_token, tokenizer_model=args.tokenizer_model,
                          json_key=args.json_key, max_documents=args.max_documents)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
