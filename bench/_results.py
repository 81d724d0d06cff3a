"""Where every benchmark writes its full result: ``bench/results/<name>.json``.

A figure quoted in the README must come from a run that can be looked at again, so each
benchmark saves everything it measured together with what it ran on: the machine (CPU
model, cores it was allowed to use, memory), the versions of Python and the libraries
that shape the numbers, the git commit (and whether the tree had uncommitted changes),
the command line and when it ran. The file is overwritten by the next run of the same
benchmark; git keeps the earlier ones.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["RESULTS_DIR", "environment", "write_result"]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
# The libraries whose versions can move a figure; a missing one is recorded as None.
_LIBRARIES = ("torch", "transformers", "peft", "websockets", "msgpack", "numpy", "bitsandbytes", "gguf")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """The machine, versions and commit a result was measured on."""
    try:
        usable_cores: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable_cores = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "machine": {
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "usable_cores": usable_cores,
            "memory_total_bytes": _memory_total_bytes(),
            "platform": platform.platform(),
        },
        "versions": {"python": platform.python_version(), **{name: _version(name) for name in _LIBRARIES}},
        "git": {"commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None},
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else None,
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_result(name: str, result: dict[str, Any], details: dict[str, Any] | None = None) -> Path:
    """Write ``bench/results/<name>.json``: ``result`` (the figures the benchmark's last
    JSON line carries), ``details`` (everything else it measured: every repetition, every
    row of its table) and :func:`environment`. Returns the path written."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    document = {"benchmark": name, "result": result, "details": details or {}, "environment": environment()}
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(temporary, path)  # never leave a half-written result behind
    return path
