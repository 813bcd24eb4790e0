"""Console lines (rank 0 only) and TensorBoard scalars for training and validation.

    logger = TrainLogger(logging_cfg, is_rank0=True, max_steps=3)
    logger.log_train(record)      # record: dict from the train loop (see ``train.py``)
    logger.log_eval(record)
    logger.close()

One compact console line per ``--log-interval``::

    iter 100/1000 | samples 3200 | loss 4.213 (lm 4.190 lat 0.023) | lr 2.9e-04 | gnorm 0.81 |
    tok/s 12,345 | TFLOP/s 0.52 | MFU 1.3% | steps 2.14 [0:.05 1:.10 2:.11 3:.74] | skipped 0 | mem 1.2G
"""
from __future__ import annotations

import os
import sys
from typing import Optional

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

    def print(self, text: str) -> None:
        if self.is_rank0 and not self.cfg.quiet:
            print(text, file=self.stream, flush=True)

    def log_train(self, r: dict) -> None:
        self.print(format_train_line(r))
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
        if self.writer is not None:
            for key in ("lm_loss", "ppl", "loss", "mean_latent_steps"):
                self.writer.add_scalar(f"valid/{key}", r[key], r["iteration"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
