"""Console lines, TensorBoard scalars and a JSON-lines metrics file (rank 0 only), for training and
validation.

    logger = TrainLogger(logging_cfg, is_rank0=True)
    logger.log_train(record)      # record: dict from the train loop (see ``train.py``)
    logger.log_eval(record)
    logger.close()

One compact console line per ``--log-interval``::

    iter 100/1000 | samples 3200 | loss 4.213 (lm 4.190 lat 0.023) | lr 2.9e-04 | gnorm 0.81 |
    tok/s 12,345 | TFLOP/s 0.52 | MFU 1.3% | steps 2.14 [0:.05 1:.10 2:.11 3:.74] | skipped 0 | mem 1.2G

``--metrics-file PATH`` appends one JSON object per console line, flushed at once, with the same
numbers at full precision (non-finite values as ``null``)::

    {"kind": "train", "iteration": 100, "train_iters": 1000, "consumed_samples": 3200, "loss": 4.213,
     "lm_loss": 4.19, "latent_loss": 0.023, "lr": 0.00029, "grad_norm": 0.81, "tokens_per_s": 12345.0,
     "tflops": 0.52, "mfu": 0.013, "mean_latent_steps": 2.14, "depth_share": [0.05, 0.1, 0.11, 0.74],
     "skipped": 0, "loss_scale": null, "memory_bytes": 1288490188}
    {"kind": "valid", "iteration": 100, "loss": 4.3, "lm_loss": 4.28, "latent_loss": 0.02, "ppl": 72.2,
     "mean_latent_steps": 2.1, "depth_share": [...]}
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch


def memory_bytes(device: torch.device) -> int:
    """Max allocated bytes on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import psutil
        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f}G"


def format_train_line(r: dict) -> str:
    hist = " ".join(f"{k}:{v:.2f}" for k, v in enumerate(r["depth_share"]))
    mfu = f"{100 * r['mfu']:.2f}%" if r.get("mfu") is not None else "n/a"
    parts = [
        f"iter {r['iteration']}/{r['train_iters']}",
        f"samples {r['consumed_samples']}",
        f"loss {r['loss']:.4f} (lm {r['lm_loss']:.4f} lat {r['latent_loss']:.4f})",
        f"lr {r['lr']:.3e}",
        f"gnorm {r['grad_norm']:.3f}",
        f"tok/s {r['tokens_per_sec']:,.0f}",
        f"TFLOP/s {r['tflops']:.3f}",
        f"MFU {mfu}",
        f"steps {r['mean_latent_steps']:.2f} [{hist}]",
        f"skipped {r['skipped']}",
    ]
    if r.get("loss_scale") is not None:
        parts.append(f"scale {r['loss_scale']:.0f}")
    parts.append(f"mem {_gib(r['memory_bytes'])}")
    return " | ".join(parts)


def format_eval_line(r: dict) -> str:
    return (f"validation at iter {r['iteration']} | lm loss {r['lm_loss']:.4f} | ppl {r['ppl']:.3f} | "
            f"loss {r['loss']:.4f} | steps {r['mean_latent_steps']:.2f}")


TRAIN_METRICS = ("iteration", "train_iters", "consumed_samples", "loss", "lm_loss", "latent_loss",
                 "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "mean_latent_steps",
                 "depth_share", "skipped", "loss_scale", "memory_bytes")
EVAL_METRICS = ("iteration", "loss", "lm_loss", "latent_loss", "ppl", "mean_latent_steps",
                "depth_share")


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


def metrics_line(kind: str, r: dict) -> str:
    """One JSON line of the metrics file (``kind`` "train" or "valid")."""
    keys = TRAIN_METRICS if kind == "train" else EVAL_METRICS
    row = {"kind": kind}
    for key in keys:
        value = r.get("tokens_per_sec") if key == "tokens_per_s" else r.get(key)
        row[key] = _json_value(value)
    return json.dumps(row)


class TrainLogger:
    def __init__(self, logging_cfg, is_rank0: bool, stream=None):
        self.cfg = logging_cfg
        self.is_rank0 = is_rank0
        self.stream = stream or sys.stdout
        self.writer = None
        if is_rank0 and logging_cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir=logging_cfg.tensorboard_dir)
            except Exception as exc:  # tensorboard not installed
                self.print(f"warning: --tensorboard-dir ignored ({exc}); pip install tensorboard")
        self.metrics = None
        if is_rank0 and getattr(logging_cfg, "metrics_file", None):
            path = logging_cfg.metrics_file
            if os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            self.metrics = open(path, "a", encoding="utf-8")

    def _write_metrics(self, kind: str, r: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(metrics_line(kind, r) + "\n")
            self.metrics.flush()

    def print(self, text: str) -> None:
        if self.is_rank0 and not self.cfg.quiet:
            print(text, file=self.stream, flush=True)

    def log_train(self, r: dict) -> None:
        self.print(format_train_line(r))
        self._write_metrics("train", r)
        if self.writer is None:
            return
        it = r["iteration"]
        for key in ("loss", "lm_loss", "latent_loss", "lr", "grad_norm", "tokens_per_sec", "tflops",
                    "mean_latent_steps", "skipped", "memory_bytes"):
            self.writer.add_scalar(f"train/{key}", r[key], it)
        if r.get("mfu") is not None:
            self.writer.add_scalar("train/mfu", r["mfu"], it)
        if r.get("loss_scale") is not None:
            self.writer.add_scalar("train/loss_scale", r["loss_scale"], it)
        for k, share in enumerate(r["depth_share"]):
            self.writer.add_scalar(f"latent_depth_share/{k}", share, it)
        self.writer.add_scalar("train/loss_vs_samples", r["loss"], r["consumed_samples"])

    def log_eval(self, r: dict) -> None:
        self.print(format_eval_line(r))
        self._write_metrics("valid", r)
        if self.writer is not None:
            for key in ("lm_loss", "ppl", "loss", "mean_latent_steps"):
                self.writer.add_scalar(f"valid/{key}", r[key], r["iteration"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
