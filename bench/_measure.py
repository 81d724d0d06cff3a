"""Small measuring helpers for ``bench/zo_step.py``: a timer, and the memory counters.

The memory counters (``status_kib``, ``ru_maxrss_kib``, ``hwm_reset``,
``release_free_memory``) live in :mod:`profiles.procmem`, which the installed profiler
uses too; they are re-exported here so the benchmarks keep one import. See that
module's docstring for why VmHWM is reset right after a baseline.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

from profiles.procmem import hwm_reset, release_free_memory, ru_maxrss_kib, status_kib

__all__ = [
    "hwm_reset",
    "release_free_memory",
    "ru_maxrss_kib",
    "status_kib",
    "timed",
]


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call (garbage collected before, not during)."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()
