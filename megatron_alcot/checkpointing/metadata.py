"""Checkpoint naming, the ``latest`` pointer and ``metadata.json``.

    >>> iteration_dir("ckpts", 1000)
    'ckpts/iter_0001000'
    >>> model_file(tp=1, pp=0)
    'model_tp01_pp000.pt'
    >>> latest_iteration("ckpts")          # None when no checkpoint exists yet
    >>> meta = read_metadata("ckpts/iter_0001000")   # dict; CheckpointError when absent or bad

The fields of ``metadata.json``: docs/architecture.md §7.1.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

FORMAT_VERSION = 1
LATEST_FILE = "latest_checkpointed_iteration.txt"
METADATA_FILE = "metadata.json"
# Tensors whose dim 0 is the (padded) vocabulary.
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model. Names path and fix."""


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def model_file(tp: int, pp: int) -> str:
    return f"model_tp{tp:02d}_pp{pp:03d}.pt"


def optim_file(tp: int, pp: int, dp: int) -> str:
    return f"optim_tp{tp:02d}_pp{pp:03d}_dp{dp:03d}.pt"


def state_file(tp: int, pp: int, dp: int) -> str:
    return f"state_tp{tp:02d}_pp{pp:03d}_dp{dp:03d}.pt"


def list_iterations(load_dir: str) -> list:
    """Iterations with a complete (renamed) directory under ``load_dir``, ascending."""
    if not os.path.isdir(load_dir):
        return []
    found = []
    for name in os.listdir(load_dir):
        m = _ITER_RE.match(name)
        if m and os.path.isfile(os.path.join(load_dir, name, METADATA_FILE)):
            found.append(int(m.group(1)))
    return sorted(found)


def latest_iteration(load_dir: str) -> Optional[int]:
    """Iteration named by ``latest_checkpointed_iteration.txt``; None when there is no checkpoint."""
    path = os.path.join(load_dir, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(
            f"{path} holds {text!r}, not an iteration number; fix or delete the file, or load an "
            f"explicit iteration (available: {list_iterations(load_dir)})") from None


def resolve_iteration_dir(load_dir: str, iteration: Optional[int]) -> tuple:
    """``(iteration, directory)`` to load, or CheckpointError saying what exists instead."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"checkpoint directory {load_dir!r} does not exist; check --load")
    if iteration is None:
        iteration = latest_iteration(load_dir)
        if iteration is None:
            raise CheckpointError(
                f"no {LATEST_FILE} in {load_dir!r}: nothing was saved there yet "
                f"(complete iterations: {list_iterations(load_dir) or 'none'}); "
                "pass an explicit iteration or start without --load")
    path = iteration_dir(load_dir, iteration)
    if not os.path.isfile(os.path.join(path, METADATA_FILE)):
        available = list_iterations(load_dir)
        raise CheckpointError(
            f"no complete checkpoint for iteration {iteration} at {path!r} (missing "
            f"{METADATA_FILE}); available iterations in {load_dir!r}: {available or 'none'}")
    return iteration, path


def write_metadata_text(meta: dict) -> str:
    return json.dumps(meta, indent=1, sort_keys=True)


def read_metadata(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, METADATA_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {ckpt_dir!r} is not a complete checkpoint; "
                              "load another iteration") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); load another iteration") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version!r}; this code reads version "
                              f"{FORMAT_VERSION}. Use a matching megatron_alcot release.")
    return meta


def check_files(ckpt_dir: str, meta: dict, names) -> None:
    """Every named file exists with the size recorded at save time (catches truncation)."""
    recorded = meta.get("files", {})
    for name in names:
        path = os.path.join(ckpt_dir, name)
        if name not in recorded:
            raise CheckpointError(
                f"{path}: no such shard in this checkpoint (saved topology "
                f"{meta['topology']}); shards present: {sorted(recorded)}")
        if not os.path.isfile(path):
            raise CheckpointError(f"shard {path} is missing (metadata lists it); the checkpoint "
                                  "was copied incompletely, copy it again or load another iteration")
        size = os.path.getsize(path)
        if size != recorded[name]:
            raise CheckpointError(f"shard {path} has {size} bytes but {recorded[name]} were "
                                  "saved: it is truncated or corrupt; load another iteration")


def model_section(config: dict) -> dict:
    """The model part of a saved ``config_dict`` (``config["model"]`` or the dict itself)."""
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        return config["model"]
    return config if isinstance(config, dict) else {}


# Model-config fields that change tensor shapes or meaning (a mismatch makes loading wrong).
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "vocab_size", "untie_embeddings_and_output_weights",
                "latent_method", "latent_max_steps")


def config_diff(saved: dict, current: dict) -> list:
    """Lines ``field: checkpoint=X, current=Y`` for shape fields that differ."""
    saved, current = model_section(saved), model_section(current)
    lines = []
    for key in SHAPE_FIELDS:
        if key in saved and key in current and saved[key] != current[key]:
            lines.append(f"  {key}: checkpoint={saved[key]!r}, current={current[key]!r}")
    return lines
