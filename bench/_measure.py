"""Small measuring helpers for ``bench/zo_step.py``: timers and Linux memory counters.

Memory is read from ``/proc/self/status`` (VmRSS = resident now, VmHWM = the resident
high-water mark) and from ``getrusage``. ``ru_maxrss`` can only grow over a process's
life (and, after fork/vfork + exec, starts at the parent's high-water mark), so it
cannot tell an operation's peak from a larger transient while the model was loading.
The kernel lets a process reset its own VmHWM to its current RSS (write ``5`` to
``/proc/self/clear_refs``, Linux >= 4.0); the benchmark does that right after its
baseline so the peak it reads afterwards belongs to the measured operation only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "best_of",
    "hwm_reset",
    "release_free_memory",
    "ru_maxrss_kib",
    "status_kib",
    "timed",
]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmHWM``), or None."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def ru_maxrss_kib() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in KiB (Linux reports KiB, macOS bytes)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value // 1024 if sys.platform == "darwin" else value


def hwm_reset() -> bool:
    """Resets this process's VmHWM to its current RSS. False where not supported."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def release_free_memory() -> None:
    """Collects garbage and hands glibc's free heap pages back to the kernel.

    Done before every baseline so that memory freed by earlier work (loading, compiling)
    is not silently reused by the measured operation without showing in its RSS.
    """
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


def best_of(samples: list[float]) -> float:
    return min(samples)
