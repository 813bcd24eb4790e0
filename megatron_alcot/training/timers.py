"""Wall-clock timers for the phases of a step (forward-backward, optimizer, data, eval).

    timers = Timers(sync=device.synchronize)
    with timers("forward-backward"):
        ...
    timers.elapsed("forward-backward", reset=True)   # seconds since the last reset
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable, Optional


class Timers:
    def __init__(self, sync: Optional[Callable[[], None]] = None):
        self._sync = sync or (lambda: None)
        self._total = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._total[name] += time.perf_counter() - start

    def elapsed(self, name: str, reset: bool = True) -> float:
        value = self._total.get(name, 0.0)
        if reset:
            self._total[name] = 0.0
        return value

    def summary(self, reset: bool = True) -> dict:
        out = dict(self._total)
        if reset:
            self._total.clear()
        return out
