"""What the device has: accelerator and host memory (reported in the hello)."""

from __future__ import annotations

import platform
import re

import psutil
import torch

from protocol.messages import DeviceProfile

__all__ = ["detect_device", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """Parse '6GiB', '512 MB', '1.5g' or a plain byte count.

    Raises:
        ValueError: not a size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (examples: 6GiB, 512MB, 1073741824)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def detect_device(device: str = "auto", *, memory_budget_bytes: int | None = None) -> tuple[torch.device, DeviceProfile]:
    """Pick the training device and describe it.

    Args:
        device: "auto" (CUDA, then MPS, then CPU), or an explicit torch device string.
        memory_budget_bytes: a user-set budget reported alongside what was detected.
    """
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    chosen = torch.device(device)
    host = psutil.virtual_memory()
    total = free = 0
    name = platform.processor() or platform.machine()
    if chosen.type == "cuda":
        free, total = torch.cuda.mem_get_info(chosen)
        name = torch.cuda.get_device_name(chosen)
    elif chosen.type == "mps":
        total = host.total  # unified memory
        free = host.available
        name = "Apple MPS"
    profile = DeviceProfile(
        device_type=chosen.type if chosen.type in ("cpu", "cuda", "mps") else "cpu",
        device_name=(name or "unknown")[:200],
        accelerator_total_bytes=int(total),
        accelerator_free_bytes=int(free),
        host_total_bytes=int(host.total),
        host_free_bytes=int(host.available),
        memory_budget_bytes=memory_budget_bytes,
    )
    return chosen, profile
