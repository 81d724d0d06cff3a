"""The parameter space: every trainable parameter as a view into one flat float32 buffer.

Seeded perturbations address elements of one flat, ordered space (PROTOCOL.md §5.1).
Rather than walk hundreds of tensors per perturbation, the client moves the trainable
parameters into a single contiguous buffer once and points each parameter's ``.data``
at its slice: a perturbation is then one kernel over one buffer, the fingerprint is one
hash over one buffer, and the model itself is untouched (its modules still see ordinary
parameters). The move costs no extra memory beyond one parameter at a time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import psutil
import torch

from protocol.blocks import block_of
from protocol.perturb import Backend, apply_gaussian, apply_rademacher, padded_length

__all__ = ["ParameterSpace", "SpaceError", "HostCopy", "Distribution", "round_copy_directory",
           "sweep_stale_copies"]

logger = logging.getLogger(__name__)

Distribution = Literal["rademacher", "gaussian"]

# Bytes hashed per update() call when fingerprinting: bounds the temporary CPU copy
# that a GPU-resident space needs.
_HASH_CHUNK_ELEMENTS = 1 << 24


class SpaceError(ValueError):
    """The parameters cannot form a parameter space (dtype, sharing, shape mismatch)."""


@dataclass(frozen=True)
class SpaceEntry:
    """Where one named parameter lives in the flat space."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


class ParameterSpace:
    """An ordered set of float32 parameters stored in one padded flat buffer.

    Build it with :meth:`adopt`, which takes over the parameters' storage. Elements are
    ordered by entry (ascending name) then row-major within each tensor; the buffer is
    padded with zeros to a multiple of 64 elements (padding is never read or hashed).
    """

    def __init__(self, flat: torch.Tensor, entries: Sequence[SpaceEntry], distribution: Distribution,
                 backend: Backend = "auto") -> None:
        self.flat = flat
        self.entries = tuple(entries)
        self.numel = sum(e.numel for e in entries)
        self.distribution: Distribution = distribution
        self.backend: Backend = backend
        # Block seeds (PROTOCOL.md §5.5): seed -> the space's ranges its direction covers.
        self._block_seeds: dict[int, tuple[tuple[int, int], ...]] = {}

    @classmethod
    def adopt(
        cls,
        named_parameters: Sequence[tuple[str, torch.nn.Parameter]],
        *,
        distribution: Distribution = "rademacher",
        backend: Backend = "auto",
    ) -> ParameterSpace:
        """Move the given parameters into one flat buffer, ordered by name.

        Args:
            named_parameters: (canonical name, parameter) pairs; names must be unique and
                each parameter must appear once (tied weights under one name).
            distribution: the direction the seeds name.
            backend: perturbation backend (see :func:`protocol.perturb.apply_rademacher`).

        Raises:
            SpaceError: empty, duplicate names or parameters, or a non-float32 parameter.
        """
        if not named_parameters:
            raise SpaceError("the parameter scope selects no parameters")
        ordered = sorted(named_parameters, key=lambda item: item[0].encode("utf-8"))
        seen_names: set[str] = set()
        seen_ids: set[int] = set()
        for name, param in ordered:
            if name in seen_names:
                raise SpaceError(f"parameter name {name!r} appears twice")
            if id(param) in seen_ids:
                raise SpaceError(f"parameter {name!r} is shared under two names")
            if param.dtype != torch.float32:
                raise SpaceError(
                    f"trainable parameter {name!r} is {param.dtype}; trainable parameters "
                    "must be float32 (a zeroth-order update of ~1e-6 vanishes in 16-bit)"
                )
            seen_names.add(name)
            seen_ids.add(id(param))
        device = ordered[0][1].device
        total = sum(p.numel() for _, p in ordered)
        flat = torch.zeros(padded_length(total), dtype=torch.float32, device=device)
        entries = []
        offset = 0
        with torch.no_grad():
            for name, param in ordered:
                numel = param.numel()
                view = flat[offset : offset + numel].view(param.shape)
                view.copy_(param.data)
                param.data = view  # the old storage is freed here
                entries.append(SpaceEntry(name, tuple(param.shape), offset, numel))
                offset += numel
        logger.debug("parameter space: %d tensors, %d elements", len(entries), total)
        return cls(flat, entries, distribution, backend)

    # -- the canonical operations -------------------------------------------------

    def apply(self, seed: int, coefficient: float) -> None:
        """``theta <- theta + fl32(coefficient) * z(seed)``: over the whole space, or for a
        block seed (:meth:`use_block_seeds`) over its block only, every other element
        untouched (PROTOCOL.md §5.5)."""
        ranges = self._block_seeds.get(seed)
        if ranges is not None:
            self._apply_ranges(seed, coefficient, ranges)
        elif self.distribution == "rademacher":
            apply_rademacher(self.flat, seed, coefficient, backend=self.backend)
        else:
            apply_gaussian(self.flat, seed, coefficient)

    def _apply_ranges(self, seed: int, coefficient: float, ranges: Sequence[tuple[int, int]]) -> None:
        # Each range's 64-aligned window gets the signs of its place in the space
        # (first_word); only the range itself is written back, so elements beside it in
        # the window, other blocks' or padding, keep their bits.
        with torch.no_grad():
            for low, high in ranges:
                first = low // 64
                window = self.flat[first * 64:padded_length(high)].clone()
                apply_rademacher(window, seed, coefficient, backend="eager", first_word=first)
                self.flat[low:high].copy_(window[low - first * 64:high - first * 64])

    # -- blocks (PROTOCOL.md §5.5) ------------------------------------------------------

    def blocks(self) -> list[int]:
        """The blocks the space's tensors fall in, ascending (decoder layers, then the
        outer block if the scope has tensors outside them)."""
        return sorted({block_of(entry.name) for entry in self.entries})

    def block_ranges(self, block: int) -> tuple[tuple[int, int], ...]:
        """The ``[low, high)`` element ranges of ``block``'s tensors, merged where they touch."""
        ranges: list[list[int]] = []
        for entry in self.entries:
            if block_of(entry.name) != block:
                continue
            if ranges and ranges[-1][1] == entry.offset:
                ranges[-1][1] += entry.numel
            else:
                ranges.append([entry.offset, entry.offset + entry.numel])
        return tuple((low, high) for low, high in ranges)

    def use_block_seeds(self, seed_blocks: dict[int, int]) -> None:
        """Make the seeds of ``seed_blocks`` (seed -> block, :func:`protocol.blocks.block_seed_map`)
        block seeds: :meth:`apply` restricts their directions to their blocks.

        Raises:
            SpaceError: a Gaussian space (block directions are defined for Rademacher only).
        """
        if seed_blocks and self.distribution != "rademacher":
            raise SpaceError("block seeds need Rademacher directions")
        ranges = {block: self.block_ranges(block) for block in set(seed_blocks.values())}
        self._block_seeds = {seed: ranges[block] for seed, block in seed_blocks.items()}

    def block_seed_ranges(self, seed: int) -> tuple[tuple[int, int], ...] | None:
        """The ranges a block seed's direction covers, or None for a whole-space seed."""
        return self._block_seeds.get(seed)

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the space's ``numel`` float32 values, little-endian, in order."""
        digest = hashlib.sha256()
        real = self.flat[: self.numel]
        for start in range(0, self.numel, _HASH_CHUNK_ELEMENTS):
            chunk = real[start : start + _HASH_CHUNK_ELEMENTS].detach().cpu().numpy()
            digest.update(chunk.astype("<f4", copy=False).tobytes())
        return digest.hexdigest()

    def values(self) -> torch.Tensor:
        """The real (unpadded) elements, as a view."""
        return self.flat[: self.numel]

    def load(self, values: torch.Tensor | np.ndarray) -> None:
        """Overwrite the space with ``numel`` float32 values (padding is zeroed)."""
        source = torch.as_tensor(values)
        if source.numel() != self.numel:
            raise SpaceError(f"expected {self.numel} values, got {source.numel()}")
        with torch.no_grad():
            self.flat[: self.numel].copy_(source.reshape(-1))
            self.flat[self.numel :].zero_()

    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]


# A copy file is named ``edgefed-copy.<owner>.pid<pid>.<role>.<random>.f32``: the owner
# (the client id) says whose it is, and the pid lets a later process tell whether its
# owner is still running (sweep_stale_copies).
_COPY_FILE_PREFIX = "edgefed-copy"
_COPY_FILE_NAME = re.compile(
    r"edgefed-copy\.(?P<owner>.+)\.pid(?P<pid>[0-9]+)\.(?P<role>[a-z]+)\.[A-Za-z0-9_]+\.f32")
# A process created more than this long after a copy file was last written cannot be
# the process that wrote it: its pid was reused (after a reboot, say). The generous slack
# covers clock granularity and small clock steps, so a live owner is never mistaken.
_PID_REUSE_SLACK_S = 60.0


def round_copy_directory(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where file-backed copies live: ``<cache>/copies``, the cache being ``cache_dir`` or
    the project's model cache (``$EDGEFED_CACHE`` or ``~/.cache/edgefed``).

    On disk rather than in the system temp directory, which is often RAM (tmpfs): a
    copy in RAM would defeat the point of keeping it in a file.
    """
    if cache_dir is None:
        # model.py owns the cache location; imported here, not at the top, because it
        # pulls in transformers, which the parameter space does not otherwise need.
        from edge_client.model import default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir) / "copies"


def _safe_owner(owner: str) -> str:
    """The owner as a file-name component (client ids are already [A-Za-z0-9_.-])."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", owner)[:64] or "edgefed"


def _owner_gone(pid: int, written_at: float) -> bool:
    """Whether the process that wrote a copy file at ``written_at`` has ended.

    A pid that no process holds, a zombie (it has exited: its mappings are gone), or a
    process created after the file was written (the pid was reused) all mean the owner
    is gone. Anything we cannot tell (no permission to look) counts as alive: a live
    process's copy must never be removed.
    """
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        return process.create_time() > written_at + _PID_REUSE_SLACK_S
    except psutil.NoSuchProcess:
        return True
    except (psutil.AccessDenied, OSError):
        return False


def sweep_stale_copies(directory: str | os.PathLike) -> list[Path]:
    """Remove the copy files in ``directory`` whose owning process is no longer alive.

    A client killed outright (SIGKILL, the out-of-memory killer, a power cut on a
    platform that cannot unlink a mapped file) never runs :meth:`HostCopy.close`, so its
    copies (each as large as the trainable weights) would stay forever. Other files, and
    the copies of live processes (other clients sharing the cache), are left alone.

    Returns:
        the files removed.
    """
    folder = Path(directory)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = _COPY_FILE_NAME.fullmatch(path.name)
        if match is None:
            continue
        try:
            written_at = path.stat().st_mtime
            if _owner_gone(int(match["pid"]), written_at):
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue  # its owner, or another sweeper, removed it meanwhile
        except OSError as error:  # not ours to remove (permissions): say so, carry on
            logger.warning("cannot remove stale copy %s: %s", path, error)
    return removed


class HostCopy:
    """A copy of a parameter space kept off the training device.

    Used for the base weights (theta_0) and for the round-start snapshot that a client
    restores before applying a committed round (local training drifts from the ledger's
    model; PROTOCOL.md §6.3). ``where="memory"`` keeps a CPU tensor; ``where="file"``
    keeps a memory-mapped file, so a CPU-only client's copy lives in the page cache and
    can be evicted rather than count against its RAM budget.

    A file copy is created under ``directory`` (default: :func:`round_copy_directory`),
    named by ``owner`` (the client id), this process's pid and ``role``, and unlinked as
    soon as it is mapped where the platform allows it (POSIX): the mapping keeps the data,
    and the kernel frees the disk space when the process ends, however it ends. Where a
    mapped file cannot be unlinked (Windows) it is removed by :meth:`close`, or, after a
    crash, by the next client's :func:`sweep_stale_copies`.
    """

    def __init__(self, numel: int, *, where: Literal["memory", "file"] = "memory",
                 directory: str | os.PathLike | None = None, owner: str = "edgefed",
                 role: str = "copy") -> None:
        if not re.fullmatch(r"[a-z]+", role):
            raise ValueError(f"a copy's role is lowercase letters, got {role!r}")
        self.numel = numel
        self.where = where
        self._path: Path | None = None  # a file still to remove on close()
        if where == "memory":
            self._store: torch.Tensor | np.memmap = torch.empty(numel, dtype=torch.float32)
        else:
            folder = Path(directory) if directory is not None else round_copy_directory()
            folder.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(
                prefix=f"{_COPY_FILE_PREFIX}.{_safe_owner(owner)}.pid{os.getpid()}.{role}.", suffix=".f32",
                dir=folder)
            os.close(handle)
            path = Path(name)
            try:
                self._store = np.memmap(path, dtype="<f4", mode="w+", shape=(numel,))
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            try:
                path.unlink()
            except OSError:  # the platform keeps a mapped file's name: remove it on close()
                self._path = path
        self.valid = False

    def save(self, space: ParameterSpace) -> None:
        """Copy the space's values in."""
        values = space.values().detach()
        if isinstance(self._store, torch.Tensor):
            self._store.copy_(values)
        else:
            self._store[:] = values.cpu().numpy()
            self._store.flush()
        self.valid = True

    def restore(self, space: ParameterSpace) -> None:
        """Copy the stored values back into the space."""
        if not self.valid:
            raise SpaceError("nothing saved in this copy")
        if isinstance(self._store, torch.Tensor):
            space.load(self._store)
        else:
            space.load(torch.from_numpy(np.asarray(self._store)))

    def close(self) -> None:
        """Drop the stored values; a file copy's disk space is freed with its mapping."""
        self.valid = False
        if hasattr(self, "_store"):
            del self._store  # the last reference to a memmap unmaps it
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
