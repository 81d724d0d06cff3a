"""Client identity on the coordinator: the allow-list, signature checks, the replay guard.

The allow-list is a text file, one client a line::

    # comments and blank lines are ignored
    3mMsxLmXY0V3NUZSm3VvzNTEmhvdQThqlnwn6yjxF8k= laptop-1
    <base64 of the 32-byte raw Ed25519 public key> <client id>   # a trailing comment

The name is the **client id** that key may use: a hello is admitted only if its key is
listed, its signature over the coordinator's challenge verifies, and its ``client_id``
is the key's name (so one allowed client cannot take over another's id). Keys and
names are unique in the file.

Without an allow-list the coordinator runs in *open mode* (any client may join; nothing
is authenticated); :data:`OPEN_MODE_WARNING` is what it should log.

What is signed is defined in :mod:`protocol.signing`; the checks here use Ed25519 from
the ``cryptography`` package. Every refusal raises :class:`IdentityRefused` with a
reason code from :data:`REFUSAL_REASONS`.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.limits import MAX_ID_CHARS, PUBLIC_KEY_BYTES
from protocol.messages import Challenge, Hello, PackedUpdate, Update
from protocol.signing import hello_signed_bytes, update_signed_bytes

__all__ = [
    "AllowlistError",
    "IdentityRefused",
    "REFUSAL_REASONS",
    "OPEN_MODE_WARNING",
    "AllowEntry",
    "Allowlist",
    "decode_public_key",
    "encode_public_key",
    "format_entry",
    "parse_allowlist",
    "load_allowlist",
    "add",
    "verify_hello",
    "verify_update",
    "ReplayGuard",
]

REFUSAL_REASONS = (
    "missing_signature",  # hello or update without public_key / signature
    "unknown_key",  # hello: the public key is not in the allow-list
    "bad_signature",  # the signature does not verify with the key
    "wrong_client_id",  # hello: the key is listed under another client id
    "replay",  # update: (client_id, nonce) already seen, or the round is older than the window
    "out_of_window",  # update: round later than the open one (latest committed + 1)
    "too_many_updates",  # update: more than the guard's cap for one client in one round
)
"""Reason codes of :class:`IdentityRefused`."""

OPEN_MODE_WARNING = (
    "OPEN MODE: no allow-list is configured, so ANY client that can reach this coordinator may "
    "join under any client id, and hellos and updates are not authenticated. Use it only for a "
    "local federation; give an allow-list (edgefed-keys allow ...) for anything else."
)
"""What the coordinator should log, at WARNING, when it starts without an allow-list."""

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,%d}" % MAX_ID_CHARS, re.ASCII)
_NAME_RULE = f"1 to {MAX_ID_CHARS} characters of [A-Za-z0-9_.-] (the client id)"
_BAD_KEY = f"not a {PUBLIC_KEY_BYTES}-byte base64 Ed25519 key"
_NEW_FILE_HEADER = (
    "# edgefed allow-list: one '<base64 Ed25519 public key> <client id>' per line.\n"
    "# Add keys with: edgefed-keys allow --allowlist FILE --name CLIENT_ID PUBLIC_KEY\n"
)
_NEW_FILE_MODE = 0o644


class AllowlistError(Exception):
    """The allow-list file is unreadable or invalid, or an entry cannot be added.

    The message starts with the file (and line) concerned, e.g.
    ``allow.txt:3: not a 32-byte base64 Ed25519 key``.
    """


class IdentityRefused(Exception):
    """A hello or update failed the identity checks.

    Attributes:
        reason: one of :data:`REFUSAL_REASONS`, for logs and the wire.
        message: a human-readable explanation.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


# --------------------------------------------------------------------------- keys


def decode_public_key(text: str) -> bytes:
    """The 32 raw bytes of a standard-base64 Ed25519 public key.

    Raises:
        ValueError: ``text`` is not base64 of 32 bytes that form an Ed25519 key.
    """
    try:
        raw = base64.b64decode(text.strip().encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError(_BAD_KEY) from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(_BAD_KEY)
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ValueError(_BAD_KEY) from None
    return raw


def encode_public_key(public_key: bytes) -> str:
    """A raw 32-byte public key in standard base64 (44 characters)."""
    return base64.b64encode(public_key).decode("ascii")


def format_entry(public_key: bytes, name: str) -> str:
    """The allow-list line for a key: ``<base64 key> <name>`` (no newline)."""
    return f"{encode_public_key(public_key)} {name}"


def _check_name(name: str) -> str | None:
    """Why ``name`` is not a valid allow-list name, or None if it is."""
    if _NAME.fullmatch(name):
        return None
    return f"name {name!r} must be {_NAME_RULE}"


# ---------------------------------------------------------------------- the list


@dataclass(frozen=True)
class AllowEntry:
    """One allowed client.

    Attributes:
        public_key: the raw 32-byte Ed25519 public key.
        name: the client id the key may use.
        line: the line of the file it was read from (0 if not from a file).
    """

    public_key: bytes
    name: str
    line: int = 0


class Allowlist:
    """The allowed clients, by key and by name; keys and names are unique.

    Attributes:
        source: where the entries came from (a path, for messages).
    """

    __slots__ = ("source", "_entries", "_by_key", "_by_name", "_verifiers")

    def __init__(self, entries: Iterable[AllowEntry] = (), source: str = "<allow-list>") -> None:
        """Index ``entries``.

        Raises:
            AllowlistError: a key or a name appears twice.
        """
        self.source = source
        self._entries: tuple[AllowEntry, ...] = tuple(entries)
        self._by_key: dict[bytes, AllowEntry] = {}
        self._by_name: dict[str, AllowEntry] = {}
        self._verifiers: dict[bytes, Ed25519PublicKey] = {}
        for entry in self._entries:
            where = f"{source}:{entry.line}" if entry.line else source
            earlier = self._by_key.get(entry.public_key)
            if earlier is not None:
                raise AllowlistError(
                    f"{where}: duplicate key (already listed as {earlier.name!r}{_on_line(earlier)})")
            earlier = self._by_name.get(entry.name)
            if earlier is not None:
                raise AllowlistError(f"{where}: duplicate name {entry.name!r}{_on_line(earlier, ' (line {})')}")
            self._by_key[entry.public_key] = entry
            self._by_name[entry.name] = entry

    @property
    def entries(self) -> tuple[AllowEntry, ...]:
        """The entries in file order."""
        return self._entries

    def lookup(self, public_key: bytes) -> AllowEntry | None:
        """The entry for a raw public key, or None if it is not allowed."""
        return self._by_key.get(public_key)

    def by_name(self, name: str) -> AllowEntry | None:
        """The entry with this name (client id), or None."""
        return self._by_name.get(name)

    def verifier(self, public_key: bytes) -> Ed25519PublicKey:
        """The key object for an allowed raw key (cached).

        Raises:
            KeyError: the key is not in the list.
        """
        verifier = self._verifiers.get(public_key)
        if verifier is None:
            verifier = Ed25519PublicKey.from_public_bytes(self._by_key[public_key].public_key)
            self._verifiers[public_key] = verifier
        return verifier

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[AllowEntry]:
        return iter(self._entries)

    def __contains__(self, public_key: object) -> bool:
        return public_key in self._by_key

    def __repr__(self) -> str:
        return f"<Allowlist {self.source!r}: {len(self._entries)} keys>"


def _on_line(entry: AllowEntry, template: str = " on line {}") -> str:
    """`` on line N`` for an entry read from a file, else nothing."""
    return template.format(entry.line) if entry.line else ""


def parse_allowlist(text: str, source: str = "<allow-list>") -> Allowlist:
    """Parse allow-list text: ``<base64 key> <name>`` lines, ``#`` comments, blank lines.

    A ``#`` field after the name starts a trailing comment.

    Args:
        text: the file's content.
        source: the file's name, the prefix of error messages.

    Raises:
        AllowlistError: ``source:line: reason`` for the first invalid line, a duplicate
            key or a duplicate name.
    """
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2 and fields[2].startswith("#"):
            fields = fields[:2]
        if len(fields) != 2:
            raise AllowlistError(f"{source}:{number}: expected '<base64 key> <name>', got {len(fields)} fields")
        key_text, name = fields
        try:
            key = decode_public_key(key_text)
        except ValueError as error:
            raise AllowlistError(f"{source}:{number}: {error}") from None
        problem = _check_name(name)
        if problem is not None:
            raise AllowlistError(f"{source}:{number}: {problem}")
        entries.append(AllowEntry(key, name, number))
    return Allowlist(entries, source)


def load_allowlist(path: str | os.PathLike[str]) -> Allowlist:
    """Read and parse an allow-list file.

    Raises:
        AllowlistError: the file is missing, unreadable, not UTF-8, or invalid.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise AllowlistError(
            f"{path}: no such allow-list file (add a key with: edgefed-keys allow --allowlist {path} ...)"
        ) from None
    except OSError as error:
        raise AllowlistError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise AllowlistError(f"{path}:{line}: not UTF-8 text") from None
    return parse_allowlist(text, os.fspath(path))


def add(path: str | os.PathLike[str], public_key: bytes | str, name: str) -> AllowEntry:
    """Append an entry to an allow-list file, creating the file if absent.

    The new content goes to a temporary file in the same directory, which then replaces
    the original (so a reader never sees half a file); the original's permissions are
    kept (a new file gets 0644: it holds public keys only). A symbolic link is followed
    and its target replaced. Not safe against concurrent writers: the last one wins.

    Args:
        path: the allow-list file.
        public_key: the raw 32 bytes, or their standard base64.
        name: the client id the key may use.

    Returns:
        The entry added, with its line number in the new file.

    Raises:
        AllowlistError: an invalid key or name, a key or name already listed, an
            invalid existing file, or a write failure.
    """
    label = os.fspath(path)
    if isinstance(public_key, str):
        try:
            raw = decode_public_key(public_key)
        except ValueError as error:
            raise AllowlistError(f"{error}: {public_key!r}") from None
    else:
        raw = bytes(public_key)
        try:
            decode_public_key(encode_public_key(raw))
        except ValueError as error:
            raise AllowlistError(str(error)) from None
    problem = _check_name(name)
    if problem is not None:
        raise AllowlistError(problem)
    target = Path(os.path.realpath(path))
    if target.exists():
        current = load_allowlist(path)
        text = target.read_text(encoding="utf-8")
        mode = stat.S_IMODE(target.stat().st_mode)
    else:
        current = Allowlist((), label)
        text = _NEW_FILE_HEADER
        mode = _NEW_FILE_MODE
    earlier = current.lookup(raw)
    if earlier is not None:
        raise AllowlistError(f"{label}: this key is already listed as {earlier.name!r}{_on_line(earlier)}")
    earlier = current.by_name(name)
    if earlier is not None:
        raise AllowlistError(f"{label}: the name {name!r} is already used{_on_line(earlier)}")
    if text and not text.endswith("\n"):
        text += "\n"
    text += format_entry(raw, name) + "\n"
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(text.encode("utf-8"))
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise AllowlistError(f"{label}: cannot write: {error.strerror or error}") from None
    return AllowEntry(raw, name, text.count("\n"))


# ------------------------------------------------------------------ verification


def _verify(key: Ed25519PublicKey, signature: bytes, data: bytes, what: str) -> None:
    """Check one Ed25519 signature.

    Raises:
        IdentityRefused: ``bad_signature``.
    """
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise IdentityRefused("bad_signature", f"the {what} signature does not verify") from None


def verify_hello(allowlist: Allowlist, challenge: Challenge, hello: Hello) -> str:
    """Admit a hello: a listed key, a valid signature over this challenge, its own name.

    Args:
        allowlist: the allowed clients.
        challenge: the challenge sent on this connection.
        hello: the hello received on it.

    Returns:
        The name of the key's entry (equal to ``hello.client_id``).

    Raises:
        IdentityRefused: ``missing_signature`` (no public key or no signature),
            ``unknown_key``, ``bad_signature``, or ``wrong_client_id`` (the key is
            listed under another client id).
    """
    if hello.public_key is None or hello.signature is None:
        raise IdentityRefused("missing_signature",
                              "this coordinator admits only signed hellos from listed keys")
    entry = allowlist.lookup(hello.public_key)
    if entry is None:
        raise IdentityRefused("unknown_key",
                              f"public key {encode_public_key(hello.public_key)} is not in the allow-list")
    _verify(allowlist.verifier(hello.public_key), hello.signature, hello_signed_bytes(challenge, hello), "hello")
    if entry.name != hello.client_id:
        raise IdentityRefused("wrong_client_id",
                              f"this key is allowed as {entry.name!r}, not as {hello.client_id!r}")
    return entry.name


def verify_update(public_key: bytes | Ed25519PublicKey, challenge: Challenge,
                  update: Update | PackedUpdate) -> None:
    """Check an update's signature with the key its connection's hello proved.

    Args:
        public_key: the client's key (raw 32 bytes, or a key object, e.g. from
            :meth:`Allowlist.verifier`).
        challenge: the challenge of the connection the update arrived on.
        update: the update.

    Raises:
        IdentityRefused: ``missing_signature`` or ``bad_signature`` (also for an update
            altered in any field, sent by another key, or taken from another
            connection or federation).
    """
    if update.signature is None:
        raise IdentityRefused("missing_signature", "this coordinator admits only signed updates")
    key = public_key if isinstance(public_key, Ed25519PublicKey) else Ed25519PublicKey.from_public_bytes(public_key)
    _verify(key, update.signature, update_signed_bytes(challenge, update), "update")


# ------------------------------------------------------------------ replay guard


class ReplayGuard:
    """Refuses an update whose ``(client_id, nonce)`` was already seen in its round.

    Memory is bounded: the guard remembers nonces only for rounds ``L - window`` to
    ``L + 1``, where ``L`` is the latest committed round (tell it with
    :meth:`committed`); older rounds are forgotten, so updates for them are refused as
    ``replay`` (they cannot be told apart from one), and updates for rounds beyond
    ``L + 1`` (not open yet) as ``out_of_window``. Within a round it keeps at most
    ``max_nonces_per_client`` nonces per client, one per attempt for an honest client;
    past that it refuses ``too_many_updates``. A nonce is remembered as soon as it is
    checked, whether or not the update is then accepted.

    Call :meth:`check` after the update's signature verified (so a forger cannot burn
    a client's nonces) and after the round checks that need no memory (the update is
    for the open attempt), just before accepting it.

    Attributes:
        window: how many committed rounds below the latest are remembered.
        max_nonces_per_client: nonces kept per client per round.
    """

    __slots__ = ("window", "max_nonces_per_client", "_latest", "_rounds")

    def __init__(self, committed_round: int = 0, *, window: int = 2, max_nonces_per_client: int = 256) -> None:
        """Start with nothing remembered.

        Args:
            committed_round: the latest committed round now (the ledger's).
            window: committed rounds below the latest still remembered (>= 0).
            max_nonces_per_client: cap per client per round (>= 1).
        """
        if window < 0 or max_nonces_per_client < 1:
            raise ValueError("window must be >= 0 and max_nonces_per_client >= 1")
        self.window = window
        self.max_nonces_per_client = max_nonces_per_client
        self._latest = committed_round
        self._rounds: dict[int, dict[str, set[bytes]]] = {}

    @property
    def latest_committed(self) -> int:
        """The latest committed round the guard was told of."""
        return self._latest

    def committed(self, round: int) -> None:
        """Record that ``round`` was committed and forget rounds below ``round - window``."""
        if round <= self._latest:
            return
        self._latest = round
        oldest = round - self.window
        for stale in [number for number in self._rounds if number < oldest]:
            del self._rounds[stale]

    def check(self, update: Update | PackedUpdate) -> None:
        """Remember the update's ``(client_id, nonce)`` for its round; refuse a repeat.

        Raises:
            IdentityRefused: ``replay`` (seen before, or round older than the window),
                ``out_of_window`` (round later than the open one) or
                ``too_many_updates``.
        """
        if update.round < self._latest - self.window:
            raise IdentityRefused(
                "replay", f"round {update.round} is older than the replay window (latest committed {self._latest})")
        if update.round > self._latest + 1:
            raise IdentityRefused(
                "out_of_window", f"round {update.round} is not open (latest committed {self._latest})")
        nonces = self._rounds.setdefault(update.round, {}).setdefault(update.client_id, set())
        if update.nonce in nonces:
            raise IdentityRefused(
                "replay", f"update nonce {update.nonce.hex()} of {update.client_id!r} was already used in round "
                f"{update.round}")
        if len(nonces) >= self.max_nonces_per_client:
            raise IdentityRefused(
                "too_many_updates", f"{update.client_id!r} sent more than {self.max_nonces_per_client} updates "
                f"in round {update.round}")
        nonces.add(update.nonce)

    def __len__(self) -> int:
        """How many nonces are remembered."""
        return sum(len(nonces) for clients in self._rounds.values() for nonces in clients.values())
