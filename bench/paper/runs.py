"""One training run through the project's own trainer, with what the table needs recorded.

    rec = run_training("alcot3", argv, out_dir="bench_out/paper/runs")
    rec["valid_ppl"], rec["train_flops"], rec["tokens_seen"], rec["evals"], rec["seconds"]

``argv`` goes unchanged to ``megatron_alcot.training.train.train`` (the in-process form of
``pretrain_alcot.py``). A forward hook on the model adds, without a second training loop:

* training FLOPs of what executed: every training micro-batch's ``num_steps`` through the
  project's counter (``training.flops_meter.FlopsMeter``, i.e. ``model.flops.training_flops``);
* the per-token results of the final validation pass: readout loss, executed latent steps, loss
  mask and the first router's continue probability ``g_{t,0}`` of every validation token, saved as
  ``{name}_tokens.npz`` for the difficulty analysis.

A run whose record exists with the same flags and the same trainer source (``code_fingerprint``) is
not trained again (``force=True`` retrains); a record left by other code is retrained.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import List, Optional

import numpy as np
import torch

from bench.paper.presets import flag_value


class _Recorder:
    def __init__(self):
        self.model = None
        self.meter = None
        self.train_flops = 0.0
        self.train_tokens = 0
        self.in_eval = False
        self.eval_batches: List[tuple] = []

    def attach(self, model):
        from megatron_alcot.training.flops_meter import FlopsMeter
        self.model = model
        self.meter = FlopsMeter(model.config)
        model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, out):
        steps = out.num_steps.detach().cpu() if out.num_steps is not None else \
            torch.zeros_like(args[0] if args else kwargs["tokens"]).cpu()
        if module.training:
            self.in_eval = False
            self.train_flops += self.meter.micro_batch_flops(steps)
            self.train_tokens += steps.numel()
            return
        if not self.in_eval:           # a new validation pass starts: keep only the latest one
            self.in_eval, self.eval_batches = True, []
        mask = kwargs.get("loss_mask")
        mask = torch.ones(steps.shape) if mask is None else mask.detach().float().cpu()
        loss = out.per_token_loss.detach().float().cpu() if out.per_token_loss is not None else \
            torch.full(steps.shape, float("nan"))
        labels = kwargs.get("labels")
        # g_{t,0}: the router's continuous verdict before the threshold turns it into a step count.
        g = out.continue_prob
        g0 = g[..., 0].detach().float().cpu() if g is not None and g.shape[-1] > 0 else \
            torch.full(steps.shape, float("nan"))
        self.eval_batches.append((loss, steps, mask, labels.detach().cpu() if labels is not None else None, g0))


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """sha256 of the ``megatron_alcot`` package's Python sources (what a run's numbers depend on)."""
    import megatron_alcot
    root = os.path.dirname(os.path.abspath(megatron_alcot.__file__))
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                digest.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:16]


def _cat(items, dtype):
    return np.concatenate([np.asarray(x, dtype=dtype).reshape(-1) for x in items]) if items else \
        np.zeros(0, dtype)


def run_training(name: str, argv: List[str], out_dir: str, label: str = "", force: bool = False,
                 log_path: Optional[str] = None) -> dict:
    """Train (or reuse) one run; returns its JSON-able record."""
    os.makedirs(out_dir, exist_ok=True)
    rec_path = os.path.join(out_dir, f"{name}.json")
    if not force and os.path.exists(rec_path):
        with open(rec_path) as f:
            rec = json.load(f)
        if rec.get("argv") == list(argv) and rec.get("code") == code_fingerprint():
            rec["reused"] = True
            return rec
    from megatron_alcot.arguments import parse_args
    from megatron_alcot.training.train import train
    recorder = _Recorder()
    log_path = log_path or os.path.join(out_dir, f"{name}.log")
    start = time.time()
    from megatron_alcot.training.train import NanSkipLimitError
    with open(log_path, "w") as log:
        log.write("pretrain_alcot.py " + " ".join(argv) + "\n")
        log.flush()
        try:
            history = train(parse_args(list(argv)), on_model_built=recorder.attach, stream=log)
        except NanSkipLimitError as exc:
            # A diverged run is a result too: record it (and what it executed) instead of stopping the table.
            return _save(rec_path, {
                "name": name, "label": label or name, "argv": list(argv), "code": code_fingerprint(),
                "failed": str(exc),
                "method": flag_value(argv, "--latent-method", "alcot"), "valid_ppl": None, "valid_lm_loss": None,
                "valid_mean_latent_steps": None, "valid_depth_share": None, "evals": [],
                "tokens_seen": recorder.train_tokens, "train_flops": recorder.train_flops,
                "seconds": round(time.time() - start, 1), "started_at": start, "finished_at": time.time()})
    seconds = time.time() - start
    cfg = history.config
    seq, gbs = cfg["model"]["seq_length"], cfg["train"]["global_batch_size"] or cfg["train"]["micro_batch_size"]
    params = sum(p.numel() for p in recorder.model.parameters())
    embed = sum(p.numel() for n, p in recorder.model.named_parameters()
                if n in ("embedding.word_embeddings.weight", "output_layer.weight"))
    final = history.evals[-1] if history.evals else {}
    batches = recorder.eval_batches
    tokens = {"loss": _cat([b[0] for b in batches], np.float32),
              "steps": _cat([b[1] for b in batches], np.int16),
              "mask": _cat([b[2] for b in batches], np.float32),
              "labels": _cat([b[3] for b in batches if b[3] is not None], np.int32),
              "continue_prob0": _cat([b[4] for b in batches], np.float32)}
    np.savez_compressed(os.path.join(out_dir, f"{name}_tokens.npz"), **tokens)
    rec = {
        "name": name, "label": label or name, "argv": list(argv), "code": code_fingerprint(),
        "method": cfg["model"]["latent_method"], "latent_max_steps": cfg["model"]["latent_max_steps"],
        "num_layers": cfg["model"]["num_layers"], "parameters": params,
        "non_embedding_parameters": params - embed,
        "iterations": history.iteration, "tokens_seen": history.consumed_samples * seq,
        "train_tokens_counted": recorder.train_tokens, "train_flops": recorder.train_flops,
        "valid_lm_loss": final.get("lm_loss"), "valid_ppl": final.get("ppl"),
        "valid_mean_latent_steps": final.get("mean_latent_steps"),
        "valid_depth_share": final.get("depth_share"),
        "valid_tokens": int(tokens["mask"].sum()),
        "evals": [{"iteration": e["iteration"], "tokens_seen": e["iteration"] * gbs * seq,
                   "ppl": e["ppl"], "lm_loss": e["lm_loss"], "mean_latent_steps": e["mean_latent_steps"]}
                  for e in history.evals if e],
        "train_lm_loss": [s["lm_loss"] for s in history.iterations],
        "train_mean_latent_steps": [s["mean_latent_steps"] for s in history.iterations],
        "seconds": round(seconds, 1), "started_at": start, "finished_at": start + seconds,
        "exit_reason": history.exit_reason,
    }
    return _save(rec_path, rec)


def _save(path: str, rec: dict) -> dict:
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(path + ".tmp", path)
    return rec


def load_tokens(out_dir: str, name: str) -> dict:
    with np.load(os.path.join(out_dir, f"{name}_tokens.npz")) as z:
        return {k: z[k] for k in z.files}
