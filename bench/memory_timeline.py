"""Live bytes of the CPU allocator over a run, counted on every thread, with named phases.

    timeline = record(lambda: train(argv), phases={"step": (train_mod, "train_step")})
    timeline.peak("step", first=1)        # largest live count inside every "step" span but the first
    timeline.live_before("step")          # live bytes as each "step" span opens

Why not the profiler's own per-event sizes: ``torch.profiler`` with ``profile_memory`` reports an
allocation or a free only on threads that run under the profiler. A tensor allocated on the main
thread whose last reference goes away on another thread (a gloo collective's work object, finished
and released by gloo's worker thread after ``wait()`` returned) is never seen as freed, so summing
the events drifts upwards by whole buffers at random (which thread drops the reference last is a
race). With ``count_every_thread`` the CPU allocator itself keeps the count for every thread, and
each event carries that count (``total_allocated``), so the timeline below is the process's live
tensor bytes, sampled at every allocation and free of the profiled threads, less what was live
when the recording started.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch

_FLAG = "FLAGS_caffe2_report_cpu_memory_usage"
_START = "memory_timeline.start"


def count_every_thread() -> None:
    """Make c10's CPU allocator count allocations and frees of every thread (its
    ``caffe2_report_cpu_memory_usage`` flag; not reachable from Python otherwise). It stays on for
    the process: a tensor recorded in one run and freed after it must leave the count."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    ctypes.c_bool.in_dll(lib, _FLAG).value = True


@dataclass
class Timeline:
    """``samples``: (time ns, live bytes of the process) at every recorded allocation and free;
    ``spans``: name -> [(start ns, end ns)] of each marked call, in call order."""

    samples: List[Tuple[int, int]]
    spans: Dict[str, List[Tuple[int, int]]] = field(default_factory=dict)

    def peak_between(self, lo: int, hi: int) -> int:
        inside = [b for t, b in self.samples if lo <= t <= hi]
        before = [b for t, b in self.samples if t < lo]
        return max(inside + before[-1:] or [0])

    def peaks(self, name: str) -> List[int]:
        """Largest live bytes inside each ``name`` span."""
        return [self.peak_between(lo, hi) for lo, hi in self.spans.get(name, [])]

    def peak(self, name: str, first: int = 0) -> int:
        """Largest live bytes inside the ``name`` spans from the ``first``-th on."""
        return max(self.peaks(name)[first:], default=0)

    def live_before(self, name: str) -> List[int]:
        """Live bytes as each ``name`` span opens."""
        out = []
        for lo, _ in self.spans.get(name, []):
            before = [b for t, b in self.samples if t < lo]
            out.append(before[-1] if before else 0)
        return out


@contextlib.contextmanager
def _marked(owner, attr: str, name: str):
    from torch.profiler import record_function
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        with record_function(name):
            return original(*args, **kwargs)

    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        setattr(owner, attr, original)


def _allocations(results):
    from torch._C._profiler import _EventType
    stack = list(results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            yield event.start_time_ns, event.extra_fields.total_allocated


def record(fn: Callable[[], object], phases: Dict[str, Tuple[object, str]]) -> Timeline:
    """Run ``fn`` under ``torch.profiler`` with ``profile_memory``, counting every thread;
    ``phases`` maps a span name to ``(owner, attribute)``, a function looked up through ``owner``
    that is marked for the run. Live bytes count from the start of the recording."""
    from torch.profiler import ProfilerActivity, profile, record_function
    count_every_thread()
    gc.collect()
    with contextlib.ExitStack() as stack:
        for name, (owner, attr) in phases.items():
            stack.enter_context(_marked(owner, attr, name))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with record_function(_START):
                probe = torch.empty(1)      # its event carries the count at the start
            del probe
            fn()
    results = prof.profiler.kineto_results
    spans: Dict[str, List[Tuple[int, int]]] = {name: [] for name in phases}
    for event in results.events():
        if event.name() in spans:
            spans[event.name()].append((event.start_ns(), event.end_ns()))
    for name in spans:
        spans[name].sort()
    samples = sorted(_allocations(results))
    start = next(e.start_ns() for e in results.events() if e.name() == _START)
    first = next((t, b) for t, b in samples if t >= start)
    baseline = first[1] - torch.empty(1).untyped_storage().nbytes()
    return Timeline([(t, b - baseline) for t, b in samples], spans)
