"""Timing helper the CPU benchmark scripts share (imported as a sibling: benchmarks/ is on sys.path)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(function: Callable[[], object], calls: int, warmup: int) -> float:
    """Median wall time of `calls` calls of `function`, after `warmup` untimed ones."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)
