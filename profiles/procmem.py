"""This process's memory counters on Linux, for measuring one operation's peak.

Used by the profiler's child processes (:mod:`profiles.profiler`) and re-exported by
``bench/_measure.py`` for the benchmarks; it lives in the package so that an installed
copy of edgefed can profile without the repository's ``bench/`` folder.

Memory is read from ``/proc/self/status`` (VmRSS = resident now, VmHWM = the resident
high-water mark) and from ``getrusage``. ``ru_maxrss`` can only grow over a process's
life (and, after fork/vfork + exec, starts at the parent's high-water mark), so it
cannot tell an operation's peak from a larger transient while the model was loading.
The kernel lets a process reset its own VmHWM to its current RSS (write ``5`` to
``/proc/self/clear_refs``, Linux >= 4.0); a measurement does that right after its
baseline so the peak it reads afterwards belongs to the measured operation only.
psutil (a dependency) reports RSS but neither VmHWM nor its reset, hence /proc.

Standard library only: no torch, so the package's layering rules hold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from pathlib import Path

__all__ = ["hwm_reset", "release_free_memory", "ru_maxrss_kib", "status_kib"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmHWM``), or None
    where there is no such file or field (not Linux)."""
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
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass
