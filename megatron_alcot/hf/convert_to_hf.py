"""Export a native megatron_alcot checkpoint (any TP/PP) to a Hugging Face directory.

    python tools/checkpoint/convert_to_hf.py --load ckpts/ --save hf_out/ \
        [--iteration N] [--base-only] [--dtype float32|bfloat16] [--max-shard-size 2GB] \
        [--tokenizer-model tok.model] [--overwrite]

    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained("hf_out", trust_remote_code=True)

A vanilla model (or ``--base-only``: step 0 only, latent parameters dropped, embedding scale folded
in) is written as a stock ``LlamaForCausalLM``; an ALCoT / loop / pause / ponder model as
``model_type: llama_alcot`` with ``configuration_llama_alcot.py`` + ``modeling_llama_alcot.py``
copied in and ``auto_map`` set. The directory gets ``config.json``, ``generation_config.json``,
safetensors weights (``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` plus
``model.safetensors.index.json`` above ``--max-shard-size``) and the tokenizer: ``tokenizer.model``
+ ``tokenizer_config.json`` for SentencePiece (``add_bos_token: false``, as Megatron preprocessing
adds no BOS), or ``tokenizer.json`` (+ its config) for a Hugging Face tokenizer.

Everything is written to ``HF_DIR.tmp-*`` and renamed at the end: on any error nothing is left
under the target name.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys


import torch

from megatron_alcot.checkpointing.hf_adapter import (exports_as_plain_llama,
                                                     hf_config_from_model_config, to_hf)
from megatron_alcot.config import LATENT_METHODS, ModelConfig
from megatron_alcot.utils.atomic import atomic_directory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SP_TYPES = ("SentencePieceTokenizer", "Llama2Tokenizer", "GPTSentencePieceTokenizer")


class ExportError(RuntimeError):
    """The export cannot proceed; the message says what to fix."""


def parse_size(text: str) -> int:
    """``"2GB"`` / ``"500MB"`` / ``"123"`` -> bytes (decimal units, as Hugging Face uses)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*", str(text).upper())
    if not m:
        raise ExportError(f"--max-shard-size {text!r}: use a size such as 2GB, 500MB or 1000000")
    unit = (m.group(2) or "B").rstrip("B").rstrip("I") or "B"
    scale = {"B": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12}[unit]
    return int(float(m.group(1)) * scale)


# ----------------------------------------------------------------------------- weights
def write_safetensors(hf_sd: dict, out_dir: str, max_shard_bytes: int) -> list:
    """One ``model.safetensors``, or shards + ``model.safetensors.index.json`` when larger."""
    from safetensors.torch import save_file
    shards, current, size = [], {}, 0
    for name in sorted(hf_sd):
        t = hf_sd[name].contiguous()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    if current:
        shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata=meta)
        names.append(fname)
        for key, t in shard.items():
            weight_map[key] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


# ----------------------------------------------------------------------------- tokenizer
def tokenizer_source(meta: dict, tokenizer_model: str | None):
    """``(tokenizer_type, path)`` from the flag or the checkpoint's data config (or (None, None))."""
    data = (meta.get("config") or {}).get("data") or {}
    ttype = data.get("tokenizer_type")
    path = tokenizer_model or data.get("tokenizer_model")
    if tokenizer_model and ttype not in SP_TYPES + ("HuggingFaceTokenizer",):
        ttype = "HuggingFaceTokenizer" if (os.path.isdir(path) or path.endswith(".json")) else "Llama2Tokenizer"
    if ttype in (None, "NullTokenizer") or not path:
        return None, None
    if not os.path.exists(path):
        raise ExportError(f"tokenizer {path!r} (from {'--tokenizer-model' if tokenizer_model else 'the checkpoint'}"
                          ") does not exist; pass --tokenizer-model PATH")
    return ttype, path


def tokenizer_info(ttype: str | None, path: str | None, vocab_size: int) -> dict:
    """bos/eos/pad ids; raises when the tokenizer's vocabulary disagrees with the model's."""
    if ttype is None:
        return {}
    from megatron_alcot.data.tokenizers import build_tokenizer
    tok = build_tokenizer(ttype, tokenizer_model=path)
    if tok.vocab_size != vocab_size:
        raise ExportError(f"the tokenizer {path} has {tok.vocab_size} tokens but the checkpoint's model has "
                          f"vocab_size {vocab_size}; pass the tokenizer the model was trained with")
    ids = {"bos_token_id": tok.bos, "eos_token_id": tok.eod, "pad_token_id": tok.pad}
    return {k: (int(v) if v is not None and v >= 0 else None) for k, v in ids.items()}


def write_tokenizer(ttype: str | None, path: str | None, out_dir: str, info: dict, max_len: int) -> list:
    if ttype is None:
        return []
    if ttype in SP_TYPES:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=path)
        shutil.copyfile(path, os.path.join(out_dir, "tokenizer.model"))

        def piece(i):
            return sp.id_to_piece(i) if i is not None and 0 <= i < sp.get_piece_size() else None

        cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
               "bos_token": piece(info.get("bos_token_id")), "eos_token": piece(info.get("eos_token_id")),
               "unk_token": piece(sp.unk_id()), "pad_token": piece(info.get("pad_token_id")),
               "model_max_length": max_len, "legacy": False, "add_prefix_space": None,
               "clean_up_tokenization_spaces": False}
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump({k: v for k, v in cfg.items() if v is not None or k == "add_prefix_space"}, f, indent=2)
        return ["tokenizer.model", "tokenizer_config.json"]
    src = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    shutil.copyfile(src, os.path.join(out_dir, "tokenizer.json"))
    written = ["tokenizer.json"]
    cfg_src = os.path.join(os.path.dirname(src), "tokenizer_config.json")
    if os.path.exists(cfg_src):
        shutil.copyfile(cfg_src, os.path.join(out_dir, "tokenizer_config.json"))
    else:
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}, f, indent=2)
    written.append("tokenizer_config.json")
    return written


# ----------------------------------------------------------------------------- main job
def convert_to_hf(load: str, save: str, iteration: int | None = None, base_only: bool = False,
                  dtype: str = "float32", max_shard_size: str = "2GB", tokenizer_model: str | None = None,
                  overwrite: bool = False, log=print) -> str:
    """Export ``load`` (a checkpoint directory) to ``save``; returns ``save``."""
    from megatron_alcot.checkpointing import load_full_state_dict
    from megatron_alcot.checkpointing.metadata import model_section
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    save = os.path.abspath(save)
    if os.path.exists(save) and not overwrite:
        raise ExportError(f"{save} already exists; pass --overwrite to replace it or choose another --save")
    sd, meta = load_full_state_dict(load, iteration)
    cfg_dict = model_section(meta.get("config") or {})
    if not cfg_dict:
        raise ExportError(f"the checkpoint in {load} has no model config in its metadata.json")
    method = cfg_dict.get("latent_method", "alcot")
    if method not in LATENT_METHODS:
        raise ExportError(f"latent method {method!r} of the checkpoint is unknown to this exporter "
                          f"(known: {', '.join(LATENT_METHODS)})")
    model_cfg = ModelConfig.from_dict(cfg_dict)
    true_vocab = (meta.get("vocab") or {}).get("true_size")
    if true_vocab is not None and true_vocab != model_cfg.vocab_size:
        raise ExportError(f"metadata.json says the true vocabulary has {true_vocab} tokens but the model "
                          f"config says {model_cfg.vocab_size}")
    ttype, tpath = tokenizer_source(meta, tokenizer_model)
    info = tokenizer_info(ttype, tpath, model_cfg.vocab_size)
    hf_sd = to_hf(sd, model_cfg, base_only=base_only)
    target = DTYPES[dtype]
    hf_sd = {k: (v.to(target) if v.is_floating_point() and not k.startswith("latent.routers.") else v)
             for k, v in hf_sd.items()}
    config = hf_config_from_model_config(model_cfg, info, base_only=base_only, dtype=dtype)
    plain = exports_as_plain_llama(model_cfg, base_only)

    with atomic_directory(save) as tmp:
        files = write_safetensors(hf_sd, tmp, max_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(dict(gen, do_sample=False), f, indent=2)
        if not plain:
            from megatron_alcot.hf import copy_remote_code
            copy_remote_code(tmp)
        files += write_tokenizer(ttype, tpath, tmp, info, model_cfg.max_positions)
    log(f"wrote {'LlamaForCausalLM' if plain else 'llama_alcot (' + method + ')'} export to {save}: "
        f"{', '.join(files)}")
    return save


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="native checkpoint directory (holds iter_NNNNNNN/)")
    p.add_argument("--iteration", type=int, default=None, help="iteration to export (default: latest)")
    p.add_argument("--save", required=True, help="output Hugging Face directory (must not exist)")
    p.add_argument("--base-only", action="store_true",
                   help="export step 0 only as a plain LlamaForCausalLM (drops latent parameters)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (e.g. 2GB, 500MB)")
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer to ship (SentencePiece .model or tokenizer.json / its directory); "
                        "default: the checkpoint's --tokenizer-model")
    p.add_argument("--overwrite", action="store_true", help="replace --save if it exists")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    from megatron_alcot.checkpointing import CheckpointError
    from megatron_alcot.checkpointing.hf_adapter import HFConversionError
    try:
        convert_to_hf(args.load, args.save, args.iteration, args.base_only, args.dtype, args.max_shard_size,
                      args.tokenizer_model, args.overwrite)
    except (ExportError, CheckpointError, HFConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
