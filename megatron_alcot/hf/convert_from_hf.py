"""Import a Hugging Face LLaMA directory as a native megatron_alcot checkpoint (any TP/PP).

    python tools/checkpoint/convert_from_hf.py --load hf_llama/ --save ckpts/ \
        [--target-tensor-parallel-size 2] [--target-pipeline-parallel-size 1] \
        [--latent-method alcot --latent-max-steps 3 --latent-threshold 0.1 ...] [--overwrite]
    # then: pretrain_alcot.py ... --load ckpts/ --finetune   (continue pretraining with ALCoT)

Reads ``config.json`` and the safetensors weights (``model.safetensors`` or an index with shards),
maps them through ``checkpointing.hf_adapter.from_hf`` and writes iteration ``--iteration`` (0) with
the checkpoint module itself: ``save_checkpoint`` at TP = PP = 1, then ``reshard_checkpoint`` for the
target layout, so the files and ``metadata.json`` are exactly those the trainer writes.
Latent parameters missing from the HF directory (routers, pause embedding) are initialised as the
model initialises them. A stock LLaMA keeps its unscaled embeddings (``--latent-embed-scale 1``
unless given), so step 0 of the imported model is the original LLaMA. The tokenizer files are
copied to ``CKPT_DIR/tokenizer/`` and recorded in the checkpoint's data config.

The result appears under ``--save`` only when complete (written to a temporary sibling, renamed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys


from megatron_alcot.checkpointing.hf_adapter import (HFConversionError, from_hf,
                                                     model_config_from_hf_config)
from megatron_alcot.utils.atomic import atomic_directory

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LATENT_FLAGS = ("latent_method", "latent_max_steps", "latent_threshold", "latent_router_init_prob",
                "latent_loss_weight", "latent_loss_beta", "latent_loss_scope", "latent_readout",
                "latent_embed_scale")


class ImportError_(RuntimeError):
    """The import cannot proceed; the message says what to fix."""


def read_hf_state_dict(hf_dir: str) -> dict:
    """All tensors of ``model.safetensors`` or of the shards named in ``model.safetensors.index.json``."""
    from safetensors.torch import load_file
    single = os.path.join(hf_dir, "model.safetensors")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_file(single)
    if not os.path.exists(index):
        raise ImportError_(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json "
                           "(only safetensors weights are read)")
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    sd = {}
    for fname in sorted(set(weight_map.values())):
        path = os.path.join(hf_dir, fname)
        if not os.path.exists(path):
            raise ImportError_(f"shard {path} listed in model.safetensors.index.json is missing")
        sd.update(load_file(path))
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise ImportError_(f"tensors listed in the index are not in their shards: {missing[:5]}")
    return sd


def _data_config(hf_dir: str, ckpt_tmp: str, final: str) -> dict:
    """Copy tokenizer files to ``<ckpt>/tokenizer/`` and describe them as a DataConfig section."""
    present = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(hf_dir, n))]
    if not present:
        return {}
    os.makedirs(os.path.join(ckpt_tmp, "tokenizer"))
    for name in present:
        shutil.copyfile(os.path.join(hf_dir, name), os.path.join(ckpt_tmp, "tokenizer", name))
    tok_dir = os.path.join(final, "tokenizer")
    if "tokenizer.model" in present:
        return {"tokenizer_type": "Llama2Tokenizer", "tokenizer_model": os.path.join(tok_dir, "tokenizer.model")}
    if "tokenizer.json" in present:
        return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": tok_dir}
    return {}


def convert_from_hf(load: str, save: str, target_tp: int = 1, target_pp: int = 1, iteration: int = 0,
                    overwrite: bool = False, seed: int = 1234, log=print, **latent) -> str:
    """Import ``load`` (HF dir) into ``save`` (checkpoint dir); ``latent``: ModelConfig overrides."""
    from megatron_alcot.checkpointing import save_checkpoint
    from megatron_alcot.checkpointing.reshard import reshard_checkpoint
    from megatron_alcot.config import ParallelConfig
    from megatron_alcot.model import build_model
    cfg_path = os.path.join(load, "config.json")
    if not os.path.exists(cfg_path):
        raise ImportError_(f"{cfg_path} does not exist; --load must be a Hugging Face model directory")
    save = os.path.abspath(save)
    if os.path.exists(save) and not overwrite:
        raise ImportError_(f"{save} already exists; pass --overwrite or choose another --save")
    with open(cfg_path) as f:
        hf_cfg = json.load(f)
    overrides = {k: v for k, v in latent.items() if v is not None}
    model_cfg = model_config_from_hf_config(hf_cfg, **overrides)
    model_cfg.validate(ParallelConfig(tensor_model_parallel_size=target_tp,
                                      pipeline_model_parallel_size=target_pp))
    full = from_hf(read_hf_state_dict(load), model_cfg)
    model = build_model(model_cfg, seed=seed)
    own = model.state_dict()
    missing = [n for n in own if n not in full]
    if [n for n in missing if not n.startswith("latent.")]:
        raise HFConversionError(f"the HF weights lack {missing[:5]}")
    unexpected = [n for n in full if n not in own]
    if unexpected:
        raise HFConversionError(f"the HF weights have {unexpected[:5]}, which a {model_cfg.latent_method} "
                                "model does not have; pass the matching --latent-method")
    for name, t in full.items():
        if own[name].shape != t.shape:
            raise HFConversionError(f"{name}: HF shape {tuple(t.shape)} != model shape {tuple(own[name].shape)}")
    model.load_state_dict({**own, **full}, strict=True)
    if missing:
        log(f"initialised {len(missing)} latent parameters freshly: {', '.join(missing[:6])}")

    with atomic_directory(save) as tmp:
        data = _data_config(load, tmp, save)
        config = {"model": model_cfg.to_dict(), "data": data,
                  "parallel": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}}
        extra = {"converted_from_hf": os.path.abspath(load)}
        if target_tp == 1 and target_pp == 1:
            save_checkpoint(tmp, iteration, model, consumed_samples=0, config_dict=config, extra=extra)
        else:
            staging = os.path.join(tmp, "tp1")
            save_checkpoint(staging, iteration, model, consumed_samples=0, config_dict=config, extra=extra)
            reshard_checkpoint(staging, tmp, target_tp, target_pp, iteration=iteration, log=log)
            shutil.rmtree(staging)
    log(f"wrote {model_cfg.latent_method} checkpoint (TP {target_tp}, PP {target_pp}, iteration "
        f"{iteration}) to {save}")
    return save


def build_parser() -> argparse.ArgumentParser:
    from megatron_alcot.arguments import add_config_flags
    from megatron_alcot.config import ModelConfig
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--save", required=True, help="native checkpoint directory to create")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--iteration", type=int, default=0, help="iteration number to write (default 0)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the fresh latent parameters")
    model = p.add_argument_group("model settings, as pretrain_alcot.py has them",
                                 "Left out: as in the HF config (a stock LLaMA: --latent-method vanilla, "
                                 "--latent-embed-scale 1, so step 0 is the original model).")
    add_config_flags(model, ModelConfig, LATENT_FLAGS + ("seq_length", "make_vocab_size_divisible_by"),
                     "from the HF config")
    p.add_argument("--overwrite", action="store_true")
    return p


def get_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    from megatron_alcot.checkpointing import CheckpointError
    from megatron_alcot.config import ConfigError
    extra = {k: getattr(args, k) for k in LATENT_FLAGS + ("seq_length", "make_vocab_size_divisible_by")}
    try:
        convert_from_hf(args.load, args.save, args.target_tensor_parallel_size,
                        args.target_pipeline_parallel_size, args.iteration, args.overwrite, args.seed, **extra)
    except (ImportError_, CheckpointError, HFConversionError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
