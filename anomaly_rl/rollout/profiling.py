"""Peak memory of a piece of work, on a GPU or on the CPU, for the log-prob memory tests and benchmarks.

GPU: torch.cuda.max_memory_allocated, reset before the work. CPU: PyTorch has no CPU peak counter,
and RSS is useless for this (glibc keeps freed pages, sampling misses short peaks), so the peak is
read from the CPU allocator itself: with `profile_memory=True` the profiler records every allocation
and free of c10's CPU allocator with its size, in order. Their running sum is the exact number of
bytes held by tensors at each moment; its maximum is the peak above what was held at the start.
Deterministic for a given computation, so tests can compare peaks without tolerance for noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

T = TypeVar("T")


def _cpu_allocations(prof: Any) -> list[tuple[int, int]]:
    """(time ns, signed bytes) for every CPU allocator event the profiler saw, in time order."""
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            if fields.device.type == "cpu":
                events.append((event.start_time_ns, int(fields.alloc_size)))
        stack.extend(event.children)
    return sorted(events)


def cpu_peak_bytes(fn: Callable[[], T]) -> tuple[T, int]:
    """(fn's result, peak bytes the CPU allocator held during fn above what it held before fn).

    Tensors alive before the call count as the baseline (0); frees of them during the call lower
    the running total below 0, as they should.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    running = peak = 0
    for _, size in _cpu_allocations(prof):
        running += size
        peak = max(peak, running)
    return result, peak


def peak_bytes(fn: Callable[[], T], device: torch.device) -> tuple[T, int]:
    """(fn's result, peak bytes held during fn above the start) on `device` (cpu or cuda)."""
    if device.type != "cuda":
        return cpu_peak_bytes(fn)
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - start
