"""A client's identity: an Ed25519 keypair kept in a private key file.

The key file is PEM (PKCS #8, unencrypted), the format ``edgefed-keys new`` writes and
``openssl genpkey -algorithm ed25519`` produces. It is created with mode 0600 and
never overwritten; on POSIX systems a key file that group or others may access is
refused when loaded, as ssh does, since anyone who can read it can act as the client.
Those rules, and every message about a key file, are :mod:`protocol.keyfile`'s, which
``edgefed-keys`` on the coordinator side uses too; this module does the file I/O only.

The coordinator knows a client by its 32-byte raw public key, listed in its allow-list
as ``<base64 key> <client id>`` (:meth:`ClientIdentity.allowlist_line`). The client
proves possession by signing the coordinator's challenge in its hello
(:meth:`ClientIdentity.sign_hello`) and signs every update
(:meth:`ClientIdentity.sign_update`); what exactly is signed is defined in
:mod:`protocol.signing`.
"""

from __future__ import annotations

import base64
import dataclasses
import os
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import keyfile
from protocol.keyfile import KEY_FILE_MODE, KeyFileError
from protocol.messages import Challenge, Hello, PackedUpdate, Update
from protocol.signing import hello_signed_bytes, update_signed_bytes

__all__ = ["IdentityError", "ClientIdentity", "KEY_FILE_MODE"]

_AnyUpdate = TypeVar("_AnyUpdate", Update, PackedUpdate)

IdentityError = KeyFileError
"""A key file cannot be created or used; the message says which file and why.

The same class as :class:`protocol.keyfile.KeyFileError`, so the client and
``edgefed-keys`` fail alike on one bad file; the name stays for the client's callers.
"""


class ClientIdentity:
    """An Ed25519 keypair that signs a client's hellos and updates.

    Attributes:
        path: the key file it was loaded from or saved to, or None.
    """

    __slots__ = ("_private_key", "_public_key", "path")

    def __init__(self, private_key: Ed25519PrivateKey, path: Path | None = None) -> None:
        """Wrap an existing private key.

        Args:
            private_key: the client's Ed25519 private key.
            path: the key file it belongs to, if any (informative).
        """
        self._private_key = private_key
        self._public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.path = path

    @classmethod
    def generate(cls) -> "ClientIdentity":
        """A new random keypair, not saved anywhere."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> "ClientIdentity":
        """Generate a new keypair and save it to ``path`` (which must not exist).

        Raises:
            IdentityError: ``path`` exists or cannot be written.
        """
        identity = cls.generate()
        identity.save(path)
        return identity

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ClientIdentity":
        """Load a key file written by :meth:`save` (or any unencrypted PKCS #8 Ed25519 PEM).

        Raises:
            IdentityError: the file is missing or unreadable, is accessible by group or
                others (POSIX), is encrypted, or holds no Ed25519 private key.
        """
        path = Path(path)
        try:
            with open(path, "rb") as handle:
                keyfile.check_mode(path, os.fstat(handle.fileno()).st_mode)
                data = handle.read(keyfile.READ_LIMIT)
        except OSError as error:
            raise keyfile.os_error(path, error, "read") from None
        key = keyfile.parse_ed25519_private_key(path, data)
        return cls(key, path)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key to a new file with mode 0600 (PEM, PKCS #8, unencrypted).

        The file is created exclusively: an existing file is never overwritten. On
        failure after creation the partial file is removed.

        Raises:
            IdentityError: ``path`` exists or cannot be written.
        """
        path = Path(path)
        data = keyfile.private_key_pem(self._private_key)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
        except OSError as error:
            raise keyfile.os_error(path, error, "create") from None
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, KEY_FILE_MODE)  # the umask may only have narrowed it; make it exact
            with os.fdopen(fd, "wb", closefd=False) as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise keyfile.os_error(path, error, "write") from None
        os.close(fd)
        self.path = path

    @property
    def public_key_bytes(self) -> bytes:
        """The raw 32-byte Ed25519 public key, as sent in ``hello.public_key``."""
        return self._public_key

    @property
    def public_key_b64(self) -> str:
        """The public key in standard base64 (44 characters), as in the allow-list."""
        return base64.b64encode(self._public_key).decode("ascii")

    def allowlist_line(self, name: str) -> str:
        """The coordinator's allow-list line for this key: ``<base64 key> <name>``.

        Args:
            name: the client id the key is allowed to use.
        """
        return f"{self.public_key_b64} {name}"

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._private_key.sign(data)

    def sign_hello(self, challenge: Challenge, hello: Hello) -> Hello:
        """``hello`` with this identity's public key and its signature over the challenge.

        Args:
            challenge: the challenge received on this connection.
            hello: the hello to send; its ``public_key`` must be nil or this key, its
                ``signature`` is replaced.

        Raises:
            ValueError: ``hello.public_key`` is another key.
        """
        if hello.public_key is not None and hello.public_key != self._public_key:
            raise ValueError("hello.public_key is not this identity's key")
        unsigned = dataclasses.replace(hello, public_key=self._public_key, signature=None)
        return dataclasses.replace(unsigned, signature=self.sign(hello_signed_bytes(challenge, unsigned)))

    def sign_update(self, challenge: Challenge, update: _AnyUpdate) -> _AnyUpdate:
        """``update`` with its signature, for the connection that received ``challenge``.

        Args:
            challenge: the challenge of the connection the update is sent on.
            update: the update to send (a fresh random ``nonce`` per update); its
                ``signature`` is replaced.
        """
        return dataclasses.replace(update, signature=self.sign(update_signed_bytes(challenge, update)))

    def __repr__(self) -> str:
        where = f" {str(self.path)!r}" if self.path is not None else ""
        return f"<ClientIdentity {self.public_key_b64}{where}>"

