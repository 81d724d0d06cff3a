"""An output directory that appears whole or not at all.

An export writes several large files; a killed export must not leave a directory that
looks like a model but is half of one. Everything is written into a hidden sibling
``.<name>.partial-<pid>-<random>`` and renamed into place at the end (one ``rename`` on
the same file system, atomic). An interrupted export (an exception, Ctrl-C, SIGTERM
turned into SystemExit by the CLI) removes its partial directory; one killed outright
(SIGKILL, power loss) leaves it hidden, and the next export to the same place removes it
once its process is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["OutputExists", "atomic_directory", "sweep_partials"]

logger = logging.getLogger(__name__)


class OutputExists(FileExistsError):
    """The target exists and replacing it was not asked for."""


def _partial_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_partials(target: Path) -> list[Path]:
    """Remove the partial directories that killed exports to ``target`` left behind (a
    live export's is kept)."""
    removed = []
    prefix = _partial_prefix(target)
    if not target.parent.is_dir():
        return removed
    for path in target.parent.iterdir():
        if not path.name.startswith(prefix):
            continue
        pid_text = path.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and _alive(int(pid_text)) and int(pid_text) != os.getpid():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty directory to write into; on success it becomes ``target``.

    Args:
        target: the directory the caller wants.
        replace: replace an existing ``target`` (the old one stays whole until the new one
            is complete, then is removed); otherwise an existing target is refused.

    Raises:
        OutputExists: ``target`` exists and ``replace`` is False.
    """
    target = Path(target).absolute()
    if target.exists() and not replace:
        raise OutputExists(f"{target} already exists; choose another output or pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    for path in sweep_partials(target):
        logger.info("removed %s, left by an export that was killed", path)
    partial = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(target)}{os.getpid()}-", dir=target.parent))
    os.chmod(partial, 0o755)  # mkdtemp makes it owner-only; an exported model is not secret
    try:
        yield partial
        _sync_tree(partial)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(target)}{os.getpid()}-old-", dir=target.parent))
            os.rmdir(old)
            os.rename(target, old)
            os.rename(partial, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(partial, target)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def _sync_tree(root: Path) -> None:
    """Flush the files to disk before the rename publishes them, so a crash right after
    cannot leave a complete-looking directory of empty files."""
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
