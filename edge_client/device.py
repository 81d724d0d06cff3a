"""What the device has: accelerators, host memory, and the memory budget training may use.

:func:`detect_device` looks at the machine once (CUDA through torch: every GPU's name,
total and free memory, compute capability and bf16 support; Apple MPS; host RAM through
psutil) and returns a :class:`DeviceReport`. The report's budget is what the mode chooser
(:mod:`edge_client.chooser`) plans against:

* a user-set budget (``--memory-budget 6GiB``) wins over anything detected;
* otherwise the free memory of the pool the model will live in: the chosen GPU's free
  memory for CUDA (measured after torch created its context, so the context is already
  excluded), the host's available RAM for CPU, and for MPS the smaller of the host's
  available RAM and Metal's recommended working set (unified memory);

and a headroom fraction (default 10%) is kept free on top of the estimate, for the
allocator's caching and fragmentation and for whatever else the device runs.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass

import psutil
import torch

from protocol.messages import DeviceProfile

__all__ = ["Accelerator", "DeviceReport", "DEFAULT_HEADROOM", "detect_device", "format_bytes",
           "parse_bytes", "parse_headroom"]

DEFAULT_HEADROOM = 0.10
MAX_HEADROOM = 0.9

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
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value < 1:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return value


def parse_headroom(text: str | float) -> float:
    """Parse a headroom fraction: ``0.1``, ``"0.1"`` or ``"10%"``.

    Raises:
        ValueError: not a number in [0, 0.9].
    """
    raw = text.strip() if isinstance(text, str) else text
    try:
        value = float(raw[:-1]) / 100 if isinstance(raw, str) and raw.endswith("%") else float(raw)
    except ValueError:
        raise ValueError(f"not a headroom fraction: {text!r} (examples: 0.1, 10%)") from None
    if not 0.0 <= value <= MAX_HEADROOM:
        raise ValueError(f"the headroom must be between 0 and {MAX_HEADROOM:.0%}, got {text!r}")
    return value


def format_bytes(value: int | float) -> str:
    """A size in GiB with two decimals (``0.73 GiB``), whole GiB from 100 on."""
    gib = value / 1024**3
    return f"{gib:.2f} GiB" if gib < 100 else f"{gib:.0f} GiB"


@dataclass(frozen=True)
class Accelerator:
    """One CUDA GPU as torch sees it."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int]
    bf16: bool

    def describe(self) -> str:
        return (f"cuda:{self.index} {self.name} (sm_{self.capability[0]}{self.capability[1]}, "
                f"{format_bytes(self.free_bytes)} free of {format_bytes(self.total_bytes)}"
                f"{', bf16' if self.bf16 else ''})")


@dataclass(frozen=True)
class DeviceReport:
    """What was detected, and the budget training plans against.

    Attributes:
        device: the torch device training runs on ("cpu", "cuda:0", "mps").
        kind: "cpu", "cuda" or "mps".
        name: readable name of that device.
        accelerators: every CUDA GPU seen (empty without CUDA).
        host_total_bytes, host_free_bytes: host RAM (psutil; free = available).
        bf16: whether the training device computes in bfloat16 natively.
        detected_bytes: free memory of the pool the model lives in.
        budget_bytes: the user's budget if set, else ``detected_bytes``.
        budget_source: where ``budget_bytes`` came from, for explanations.
        user_budget_bytes: the user's budget, or None.
        headroom: fraction of the budget kept free.
    """

    device: str
    kind: str
    name: str
    accelerators: tuple[Accelerator, ...]
    host_total_bytes: int
    host_free_bytes: int
    bf16: bool
    detected_bytes: int
    budget_bytes: int
    budget_source: str
    user_budget_bytes: int | None
    headroom: float

    @property
    def usable_bytes(self) -> int:
        """The most an estimated peak may reach: the budget less the headroom."""
        return int(self.budget_bytes * (1.0 - self.headroom))

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def profile(self) -> DeviceProfile:
        """The device as the hello reports it."""
        accelerator = next((a for a in self.accelerators if self.device == f"cuda:{a.index}"), None)
        if self.kind == "mps":
            total, free = self.host_total_bytes, self.detected_bytes
        elif accelerator is not None:
            total, free = accelerator.total_bytes, accelerator.free_bytes
        else:
            total = free = 0
        return DeviceProfile(
            device_type=self.kind, device_name=(self.name or "unknown")[:200],
            accelerator_total_bytes=int(total), accelerator_free_bytes=int(free),
            host_total_bytes=int(self.host_total_bytes), host_free_bytes=int(self.host_free_bytes),
            memory_budget_bytes=self.user_budget_bytes,
        )

    def describe(self) -> str:
        """A few readable lines: what is there and what training may use."""
        lines = [f"training device: {self.device} ({self.name})"]
        lines += [f"  {a.describe()}" for a in self.accelerators]
        lines.append(f"  host RAM: {format_bytes(self.host_free_bytes)} available of "
                     f"{format_bytes(self.host_total_bytes)}")
        lines.append(f"  budget: {format_bytes(self.budget_bytes)} ({self.budget_source}), "
                     f"headroom {self.headroom:.0%}, usable {format_bytes(self.usable_bytes)}")
        return "\n".join(lines)


def _cuda_accelerators() -> tuple[Accelerator, ...]:
    found = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        major, minor = torch.cuda.get_device_capability(index)
        found.append(Accelerator(
            index=index, name=torch.cuda.get_device_name(index), total_bytes=int(total),
            free_bytes=int(free), capability=(major, minor),
            # bf16 arithmetic is native from Ampere (sm_80) on; torch's own check also
            # accepts emulated support on older cards, which is slow.
            bf16=major >= 8,
        ))
    return tuple(found)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


def _resolve(device: str) -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda:0"
        return "mps" if _mps_available() else "cpu"
    if device == "cuda":
        return "cuda:0"
    return device


def detect_device(device: str = "auto", *, memory_budget_bytes: int | None = None,
                  headroom: float = DEFAULT_HEADROOM) -> DeviceReport:
    """Pick the training device and measure the memory it offers.

    Args:
        device: "auto" (CUDA, then MPS, then CPU), or "cpu", "cuda", "cuda:N", "mps".
        memory_budget_bytes: a user-set budget; wins over the detected free memory.
        headroom: fraction of the budget to keep free (0 to 0.9).

    Raises:
        ValueError: an unknown or absent device, a non-positive budget, a bad headroom.
    """
    if memory_budget_bytes is not None and memory_budget_bytes < 1:
        raise ValueError(f"the memory budget must be positive, got {memory_budget_bytes}")
    if not 0.0 <= headroom <= MAX_HEADROOM:
        raise ValueError(f"the headroom must be between 0 and {MAX_HEADROOM}, got {headroom}")
    chosen = _resolve(device)
    match = re.fullmatch(r"(cpu|mps|cuda)(?::(\d+))?", chosen)
    if not match:
        raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)")
    kind = match.group(1)
    host = psutil.virtual_memory()
    accelerators: tuple[Accelerator, ...] = ()
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here")
        accelerators = _cuda_accelerators()
        index = int(match.group(2) or 0)
        if index >= len(accelerators):
            raise ValueError(f"device {device!r}: there are {len(accelerators)} CUDA devices")
        chosen = f"cuda:{index}"
        gpu = accelerators[index]
        name, detected, bf16 = gpu.name, gpu.free_bytes, gpu.bf16
        source = f"free memory of {chosen}"
    elif kind == "mps":
        if not _mps_available():
            raise ValueError(f"device {device!r}: Apple MPS is not available here")
        recommended = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
        working_set = int(recommended()) if callable(recommended) else host.total
        detected = min(int(host.available), working_set)
        name, bf16, source = "Apple MPS (unified memory)", True, "available unified memory"
    else:
        name = platform.processor() or platform.machine() or "cpu"
        detected, bf16, source = int(host.available), False, "available host RAM"
    if memory_budget_bytes is not None:
        budget, source = memory_budget_bytes, "set by the user"
    else:
        budget = detected
    return DeviceReport(
        device=chosen, kind=kind, name=name, accelerators=accelerators,
        host_total_bytes=int(host.total), host_free_bytes=int(host.available), bf16=bf16,
        detected_bytes=int(detected), budget_bytes=int(budget), budget_source=source,
        user_budget_bytes=memory_budget_bytes, headroom=headroom,
    )
