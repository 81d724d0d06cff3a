"""TLS for the coordinator: a local certificate authority, SSL contexts, the loopback rule.

A small federation rarely has a certificate from a public CA. :func:`create_local_ca`
makes one for it: a CA (``ca.pem``, ``ca.key``) and a server certificate signed by it
(``server.pem``, ``server.key``) naming every address and host name clients will dial.
The coordinator serves with :func:`server_ssl_context`; each client trusts ``ca.pem``
through :func:`client_ssl_context` and checks the host name as usual. ``ca.key`` never
leaves the coordinator's machine (it is only needed to issue certificates again).

Keys are ECDSA P-256, certificates SHA-256, TLS 1.2 at least. Private key files are
created with mode 0600; nothing is overwritten unless asked. The key-file rules and
messages (mode, size, format) are :mod:`protocol.keyfile`'s, shared with the client;
:func:`write_private_file` and :func:`read_private_file` are the coordinator's file I/O
around them.

The coordinator must use TLS whenever it listens beyond the loopback interface
(:func:`check_transport`); plain ``ws://`` there needs an explicit ``--insecure``.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol import keyfile

__all__ = [
    "TlsError",
    "TlsFiles",
    "DEFAULT_DAYS",
    "PRIVATE_FILE_MODE",
    "create_local_ca",
    "server_ssl_context",
    "client_ssl_context",
    "is_loopback",
    "check_transport",
    "write_private_file",
    "read_private_file",
]

logger = logging.getLogger(__name__)

DEFAULT_DAYS = 825
"""Validity of the certificates :func:`create_local_ca` makes (the most Apple clients accept)."""

PRIVATE_FILE_MODE = keyfile.KEY_FILE_MODE
"""Permissions of a private key file: read and write for its owner only."""

_PUBLIC_FILE_MODE = 0o644
_CLOCK_SKEW = datetime.timedelta(hours=1)
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)", re.ASCII)


class TlsError(Exception):
    """A certificate or key file cannot be made or used; the message says which and why."""


@dataclass(frozen=True)
class TlsFiles:
    """The files :func:`create_local_ca` writes.

    Attributes:
        ca_cert: ``ca.pem``, the CA certificate every client needs.
        ca_key: ``ca.key``, the CA's private key (stays with the coordinator).
        server_cert: ``server.pem``, the coordinator's certificate.
        server_key: ``server.key``, the coordinator's private key.
        hosts: the names and addresses the server certificate is valid for.
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]


# --------------------------------------------------------------------------- hosts


def _strip_brackets(host: str) -> str:
    """``[::1]`` as ``::1`` (URL notation for IPv6 literals)."""
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def is_loopback(host: str) -> bool:
    """Whether a listening host reaches this machine only: 127.0.0.0/8, ::1 or localhost.

    ``""``, ``0.0.0.0`` and ``::`` (every interface) and any other name are not
    loopback: a name is not resolved, since what it resolves to can change.

    Args:
        host: an IP address (IPv6 with or without brackets) or a host name.
    """
    host = _strip_brackets(host.strip())
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_transport(host: str, *, tls: bool, insecure: bool) -> None:
    """Refuse to listen beyond loopback without TLS unless ``insecure`` is set.

    Args:
        host: the host the coordinator listens on.
        tls: whether a certificate and key are configured.
        insecure: the operator's explicit ``--insecure``.

    Raises:
        TlsError: ``host`` is not loopback, ``tls`` is false and ``insecure`` is false.
    """
    if tls or insecure or is_loopback(host):
        return
    raise TlsError(
        f"refusing to listen on {host or 'every interface'} without TLS: give a certificate and key "
        "(create them with: edgefed-keys tls-init --dir certs --host ADDRESS), "
        "or pass --insecure to serve plain ws:// anyway"
    )


def _subject_alt_name(host: str) -> x509.GeneralName:
    """The SAN entry for one host: an IPAddress for an address, else a DNSName.

    Raises:
        TlsError: ``host`` is neither an IP address nor a valid DNS name.
    """
    text = _strip_brackets(host.strip())
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text.rstrip(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        raise TlsError(f"not an IP address or a DNS name: {host!r}")
    return x509.DNSName(name.lower())


# --------------------------------------------------------------------------- files


def write_private_file(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write a key file to ``path`` with mode 0600.

    Without ``overwrite`` the file is created exclusively (an existing file is an
    error); with it, a 0600 temporary file beside it replaces it atomically.

    Raises:
        KeyFileError: ``path`` exists (and not ``overwrite``) or cannot be written.
    """
    target = path
    if overwrite:
        target = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        target.unlink(missing_ok=True)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, keyfile.KEY_FILE_MODE)
    except OSError as error:
        raise keyfile.os_error(path, error, "create") from None
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, keyfile.KEY_FILE_MODE)  # exact, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(target, path)
    except OSError as error:
        target.unlink(missing_ok=True)
        raise keyfile.os_error(path, error, "write") from None


def read_private_file(path: Path) -> bytes:
    """Read a key file that only its owner may access (checked on POSIX systems).

    Raises:
        KeyFileError: the file is missing or unreadable, not a regular file, accessible
            by group or others, or too large to be a key file.
    """
    try:
        with open(path, "rb") as handle:
            keyfile.check_mode(path, os.fstat(handle.fileno()).st_mode)
            data = handle.read(keyfile.READ_LIMIT)
    except OSError as error:
        raise keyfile.os_error(path, error, "read") from None
    return keyfile.check_size(path, data)


def _write_public_file(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write a certificate (mode 0644) through a temporary file and a rename.

    Raises:
        TlsError: ``path`` exists (and not ``overwrite``) or cannot be written.
    """
    if not overwrite and path.exists():
        raise TlsError(f"{path}: already exists; refusing to overwrite")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.chmod(temporary, _PUBLIC_FILE_MODE)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise TlsError(f"{path}: cannot write: {error.strerror or error}") from None


# ------------------------------------------------------------------ certificates


def create_local_ca(
    directory: str | os.PathLike[str],
    hosts: list[str],
    days: int = DEFAULT_DAYS,
    *,
    overwrite: bool = False,
) -> TlsFiles:
    """Create a local CA and a server certificate it signs, for a small federation.

    Writes into ``directory`` (created if missing): ``ca.pem`` and ``ca.key`` (the CA,
    ``CA:TRUE, pathlen:0``, may sign certificates only), ``server.pem`` and
    ``server.key`` (``CA:FALSE``, server authentication, a subjectAltName per host:
    IP addresses as IPAddress entries, names as DNSName entries). Key files get mode
    0600, certificates 0644. Every file is checked before any is written, so an
    existing set is never half replaced.

    Args:
        directory: where to write the four files.
        hosts: the addresses and DNS names clients will connect to (at least one);
            ``[::1]`` notation is accepted. Duplicates are dropped.
        days: validity of both certificates, from one hour ago (clock skew).
        overwrite: replace existing files instead of refusing.

    Returns:
        The paths written and the hosts certified.

    Raises:
        TlsError: no host, a host that is neither an IP address nor a DNS name,
            ``days`` < 1, an existing file (without ``overwrite``), or a certificate
            write failure.
        KeyFileError: a key file write failure (:mod:`protocol.keyfile`).
    """
    if not hosts:
        raise TlsError("give at least one host (an IP address or DNS name clients will connect to)")
    if days < 1:
        raise TlsError(f"days must be at least 1, got {days}")
    names: list[x509.GeneralName] = []
    certified: list[str] = []
    for host in hosts:
        entry = _subject_alt_name(host)
        if entry not in names:
            names.append(entry)
            certified.append(str(entry.value))
    folder = Path(directory)
    files = TlsFiles(folder / "ca.pem", folder / "ca.key", folder / "server.pem", folder / "server.key",
                     tuple(certified))
    paths = (files.ca_cert, files.ca_key, files.server_cert, files.server_key)
    if not overwrite:
        existing = [str(path) for path in paths if path.exists() or path.is_symlink()]
        if existing:
            raise TlsError(f"refusing to overwrite {', '.join(existing)} (pass --force to replace them)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TlsError(f"{folder}: cannot create directory: {error.strerror or error}") from None

    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - _CLOCK_SKEW
    not_after = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefed"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"edgefed local CA {now:%Y-%m-%d %H:%M:%S}"),
    ])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefed"),
            x509.NameAttribute(NameOID.COMMON_NAME, certified[0][:64]),
        ]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    # Keys first: a crash between writes then leaves no certificate without its key.
    write_private_file(files.ca_key, keyfile.private_key_pem(ca_key), overwrite=overwrite)
    write_private_file(files.server_key, keyfile.private_key_pem(server_key), overwrite=overwrite)
    _write_public_file(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), overwrite=overwrite)
    _write_public_file(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), overwrite=overwrite)
    return files


# ------------------------------------------------------------------ SSL contexts


def server_ssl_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """The coordinator's SSL context: this certificate chain and key, TLS 1.2 at least.

    A key file that group or others can read is served anyway, with a warning.

    Args:
        cert: the server certificate (PEM; may hold the chain after it).
        key: its private key (PEM, unencrypted).

    Raises:
        TlsError: a file is missing, unreadable, or the key does not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        mode = os.stat(key).st_mode
        # Only a warning here, where a client key is refused: TLS keys issued outside
        # edgefed are often kept group-readable on purpose (Debian's ssl-cert group).
        if keyfile.is_exposed(mode):
            logger.warning("TLS %s; serving it anyway", keyfile.exposed_message(key, mode))
        context.load_cert_chain(certfile=os.fspath(cert), keyfile=os.fspath(key))
    except FileNotFoundError as error:
        raise TlsError(f"{error.filename or cert}: no such file") from None
    except ssl.SSLError as error:
        raise TlsError(f"cannot use certificate {cert} with key {key}: {error.reason or error}") from None
    except OSError as error:
        raise TlsError(f"cannot read {error.filename or cert}: {error.strerror or error}") from None
    return context


def client_ssl_context(ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A client's SSL context: verify the coordinator's certificate and host name.

    Args:
        ca_file: the federation's ``ca.pem``; None trusts the system's CAs (for a
            coordinator with a publicly issued certificate).

    Raises:
        TlsError: ``ca_file`` is missing or holds no certificate.
    """
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=os.fspath(ca_file) if ca_file is not None else None
        )
    except FileNotFoundError:
        raise TlsError(f"{ca_file}: no such CA file") from None
    except ssl.SSLError as error:
        raise TlsError(f"{ca_file}: not a PEM CA certificate ({error.reason or error})") from None
    except OSError as error:
        raise TlsError(f"{ca_file}: cannot read: {error.strerror or error}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context
