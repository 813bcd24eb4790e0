"""Sums over the iterations since the last console line, and when the next line is due.

    window = LogWindow(max_depth=3, log_interval=10, train_iters=1000, world=8, peak_flops=None,
                       device=device)
    window.add(stats, seconds)                    # after every iteration
    if window.should_log(iteration):              # every --log-interval, and the last iteration
        logger.log_train(window.record(iteration, consumed, stats))   # averages, then resets

Averages count only iterations that updated the weights; a window of skipped iterations reports
the last one's numbers.
"""
from __future__ import annotations

from megatron_alcot.training.flops_meter import FlopsMeter
from megatron_alcot.training.logging import memory_bytes


class LogWindow:
    def __init__(self, max_depth: int, log_interval: int, train_iters: int, world: int,
                 peak_flops, device):
        self.max_depth, self.log_interval, self.train_iters = max_depth, log_interval, train_iters
        self.world, self.peak_flops, self.device = world, peak_flops, device
        self.reset()

    def should_log(self, iteration: int) -> bool:
        return iteration % self.log_interval == 0 or iteration == self.train_iters

    def reset(self):
        self.seconds = self.tokens = self.flops = 0.0
        self.depth = [0.0] * (self.max_depth + 1)
        self.skipped = 0
        self.n = 0
        self.sums = {"loss": 0.0, "lm_loss": 0.0, "latent_loss": 0.0, "grad_norm": 0.0}
        self.finite = 0

    def add(self, stats, seconds: float):
        self.seconds += seconds
        self.tokens += stats.tokens
        self.flops += stats.flops
        self.depth = [a + b for a, b in zip(self.depth, stats.depth_counts)]
        self.skipped += 0 if stats.updated else 1
        self.n += 1
        if stats.updated:
            self.finite += 1
            for key in self.sums:
                self.sums[key] += getattr(stats, key)

    def record(self, iteration: int, consumed: int, last) -> dict:
        n = max(self.finite, 1)
        total_depth = sum(self.depth) or 1.0
        tflops = FlopsMeter.tflops_per_device(self.flops, self.seconds, self.world)
        r = {"iteration": iteration, "train_iters": self.train_iters, "consumed_samples": consumed,
             "loss": self.sums["loss"] / n if self.finite else last.loss,
             "lm_loss": self.sums["lm_loss"] / n if self.finite else last.lm_loss,
             "latent_loss": self.sums["latent_loss"] / n if self.finite else last.latent_loss,
             "grad_norm": self.sums["grad_norm"] / n if self.finite else last.grad_norm,
             "lr": last.lr, "tokens_per_sec": self.tokens / self.seconds if self.seconds else 0.0,
             "tflops": tflops, "mfu": FlopsMeter.mfu(tflops, self.peak_flops),
             "mean_latent_steps": sum(k * c for k, c in enumerate(self.depth)) / total_depth,
             "depth_share": [c / total_depth for c in self.depth], "skipped": self.skipped,
             "loss_scale": last.loss_scale, "memory_bytes": memory_bytes(self.device)}
        self.reset()
        return r
