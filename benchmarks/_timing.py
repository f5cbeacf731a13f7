"""What the reproduction scripts share for timing: the median wall time of a call after a warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], reps: int = 7) -> float:
    """Median seconds of ``reps`` calls of ``fn``, after one warm-up call that is not timed."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
