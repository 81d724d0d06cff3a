"""Private key files: their format, the permission rule, and every message about them.

A client key file is PEM, PKCS #8, unencrypted, holding an Ed25519 private key: what
``edgefed-keys new`` writes and ``openssl genpkey -algorithm ed25519`` produces. The
coordinator's TLS keys (``ca.key``, ``server.key``) are written in the same PEM form. A
private key file has mode 0600; on POSIX systems one that group or others may access is
refused when loaded, as ssh does, since anyone who can read it can act as its owner.

Both the client (:mod:`edge_client.identity`) and the coordinator
(:mod:`coordinator.tls`, :mod:`coordinator.keys_cli`) load and write these files, and
neither may import the other, so the rules live here, once. This module does no I/O:
its callers open, ``fstat`` and read (or create and write) the file, and hand this
module the bytes, the ``st_mode`` or the ``OSError``; it decides, and raises
:class:`KeyFileError` with a one-line message that starts with the file's path. It is
the one protocol module that uses ``cryptography``: parsing and formatting PEM is a
pure byte transformation, and a maintained parser beats a hand-written one.
"""

from __future__ import annotations

import os
import stat
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

__all__ = [
    "KeyFileError",
    "KEY_FILE_MODE",
    "MAX_KEY_FILE_BYTES",
    "READ_LIMIT",
    "is_exposed",
    "exposed_message",
    "check_mode",
    "check_size",
    "os_error",
    "parse_ed25519_private_key",
    "private_key_pem",
]

KEY_FILE_MODE = 0o600
"""Permissions of a private key file: read and write for its owner only."""

MAX_KEY_FILE_BYTES = 64 * 1024
"""The largest key file accepted (a PEM Ed25519 key is 119 bytes, an ECDSA P-256 one 241)."""

READ_LIMIT = MAX_KEY_FILE_BYTES + 1
"""How many bytes a loader reads: one more than allowed, so a larger file is told apart."""

# Whether the permission rule applies: Windows has no group/other mode bits to check.
_POSIX = os.name == "posix"


class KeyFileError(Exception):
    """A private key file cannot be created, read or used; the message says which file and why."""


def is_exposed(st_mode: int) -> bool:
    """Whether a file with this ``st_mode`` is accessible by group or others (on POSIX)."""
    return _POSIX and bool(st_mode & 0o077)


def exposed_message(path: str | os.PathLike[str], st_mode: int) -> str:
    """What to say about a key file group or others can access, with the command that fixes it."""
    return (f"{os.fspath(path)}: key file is accessible by group or others "
            f"(mode {stat.S_IMODE(st_mode):04o}); run: chmod 600 {os.fspath(path)}")


def check_mode(path: str | os.PathLike[str], st_mode: int) -> None:
    """Refuse a key file that is not a regular file, or that group or others can access.

    Called with the ``st_mode`` of the opened file (``os.fstat``), before reading from
    it: a device such as ``/dev/zero`` would never end.

    Raises:
        KeyFileError: not a regular file, or accessible by group or others (POSIX).
    """
    if not stat.S_ISREG(st_mode):
        raise KeyFileError(f"{os.fspath(path)}: not a regular file")
    if is_exposed(st_mode):
        raise KeyFileError(exposed_message(path, st_mode))


def check_size(path: str | os.PathLike[str], data: bytes) -> bytes:
    """``data`` itself, if it is no larger than a key file may be.

    Args:
        path: the file ``data`` was read from (for the message).
        data: at most :data:`READ_LIMIT` bytes read from it.

    Raises:
        KeyFileError: ``data`` is larger than :data:`MAX_KEY_FILE_BYTES`.
    """
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{os.fspath(path)}: not a key file (larger than {MAX_KEY_FILE_BYTES} bytes)")
    return data


def os_error(path: str | os.PathLike[str], error: OSError,
             action: Literal["read", "create", "write"]) -> KeyFileError:
    """The :class:`KeyFileError` for an ``OSError`` met while handling a key file.

    Args:
        path: the key file.
        error: what ``open``/``os.open``/``read``/``write`` raised.
        action: ``read`` (loading), ``create`` (opening a new file exclusively) or
            ``write`` (writing, syncing or renaming it).
    """
    name = os.fspath(path)
    if action == "read" and isinstance(error, FileNotFoundError):
        return KeyFileError(f"{name}: no such key file (create one with: edgefed-keys new --out {name})")
    if action == "read" and isinstance(error, IsADirectoryError):
        return KeyFileError(f"{name}: not a regular file")
    if action == "create" and isinstance(error, FileExistsError):
        return KeyFileError(f"{name}: already exists; refusing to overwrite")
    return KeyFileError(f"{name}: cannot {action} key file: {error.strerror or error}")


def parse_ed25519_private_key(path: str | os.PathLike[str], data: bytes) -> Ed25519PrivateKey:
    """The Ed25519 private key in a key file's bytes (unencrypted PEM, PKCS #8 or other).

    Args:
        path: the file ``data`` was read from (for the message).
        data: its content, as read with :data:`READ_LIMIT`.

    Raises:
        KeyFileError: the data is too large, not a PEM private key, encrypted, or a
            key of another algorithm.
    """
    name = os.fspath(path)
    check_size(path, data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # what cryptography raises for an encrypted key and no password
        raise KeyFileError(f"{name}: the key is encrypted; edgefed needs an unencrypted key file") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{name}: not a PEM private key file") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{name}: not an Ed25519 private key ({type(key).__name__})")
    return key


def private_key_pem(key: PrivateKeyTypes) -> bytes:
    """A private key as a key file's bytes: unencrypted PKCS #8 PEM."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
