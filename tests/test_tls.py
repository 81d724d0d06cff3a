"""TLS: the local CA, SSL contexts over a real wss:// connection, and the loopback rule."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from coordinator.tls import (
    TlsError,
    check_transport,
    client_ssl_context,
    create_local_ca,
    is_loopback,
    read_private_file,
    server_ssl_context,
    write_private_file,
)
from protocol.keyfile import KeyFileError


@pytest.mark.parametrize("host,expected", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("localhost.", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.10", False), ("10.0.0.1", False),
    ("fe80::1", False), ("coordinator.lan", False), ("localhost.example.com", False), ("128.0.0.1", False),
])
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_check_transport() -> None:
    check_transport("127.0.0.1", tls=False, insecure=False)
    check_transport("0.0.0.0", tls=True, insecure=False)
    check_transport("0.0.0.0", tls=False, insecure=True)
    with pytest.raises(TlsError, match="refusing to listen on 0.0.0.0 without TLS.*--insecure"):
        check_transport("0.0.0.0", tls=False, insecure=False)
    with pytest.raises(TlsError, match="every interface"):
        check_transport("", tls=False, insecure=False)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_local_ca(tmp_path: Path) -> None:
    files = create_local_ca(tmp_path / "certs", ["127.0.0.1", "Coordinator.LAN", "[::1]", "127.0.0.1"], days=30)
    assert files.hosts == ("127.0.0.1", "coordinator.lan", "::1")
    assert [mode_of(p) for p in (files.ca_cert, files.ca_key, files.server_cert, files.server_key)] == [
        0o644, 0o600, 0o644, 0o600]
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.lan"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    server.verify_directly_issued_by(ca)
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 30 * 86400 < lifetime.total_seconds() <= 30 * 86400 + 3600 + 5


def test_create_local_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    create_local_ca(tmp_path, ["127.0.0.1"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(TlsError, match="refusing to overwrite"):
        create_local_ca(tmp_path, ["127.0.0.1"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # one existing file is enough to refuse the whole set
    (tmp_path / "ca.pem").unlink()
    (tmp_path / "ca.key").unlink()
    (tmp_path / "server.pem").unlink()
    with pytest.raises(TlsError, match="server.key"):
        create_local_ca(tmp_path, ["127.0.0.1"])
    assert [p.name for p in tmp_path.iterdir()] == ["server.key"]
    files = create_local_ca(tmp_path, ["127.0.0.1"], overwrite=True)
    assert mode_of(files.server_key) == 0o600 and mode_of(files.ca_key) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]


@pytest.mark.parametrize("hosts,message", [
    ([], "at least one host"), (["bad host"], "not an IP address or a DNS name"), (["-x.lan"], "not an IP"),
    (["a" * 64 + ".lan"], "not an IP"), (["under_score.lan"], "not an IP"),
])
def test_create_local_ca_refuses_bad_hosts(tmp_path: Path, hosts: list[str], message: str) -> None:
    with pytest.raises(TlsError, match=message):
        create_local_ca(tmp_path / "certs", hosts)
    assert not (tmp_path / "certs").exists()


def test_private_files(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    old = os.umask(0)
    try:
        write_private_file(path, b"x" * 100_000)
    finally:
        os.umask(old)
    assert mode_of(path) == 0o600 and path.read_bytes() == b"x" * 100_000
    with pytest.raises(KeyFileError, match="not a key file"):
        read_private_file(path)
    with pytest.raises(KeyFileError, match="already exists"):
        write_private_file(path, b"y")
    write_private_file(path, b"y", overwrite=True)
    assert read_private_file(path) == b"y" and mode_of(path) == 0o600
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        read_private_file(path)
    with pytest.raises(KeyFileError, match="no such key file"):
        read_private_file(tmp_path / "missing")


def test_group_readable_tls_key_is_served_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = create_local_ca(tmp_path, ["127.0.0.1"])
    os.chmod(files.server_key, 0o640)
    with caplog.at_level("WARNING", logger="coordinator.tls"):
        server_ssl_context(files.server_cert, files.server_key)
    assert [record.getMessage() for record in caplog.records] == [
        f"TLS {files.server_key}: key file is accessible by group or others (mode 0640); "
        f"run: chmod 600 {files.server_key}; serving it anyway"]


# ------------------------------------------------------------------ contexts


def test_context_settings(tmp_path: Path) -> None:
    files = create_local_ca(tmp_path, ["127.0.0.1"])
    server = server_ssl_context(files.server_cert, files.server_key)
    client = client_ssl_context(files.ca_cert)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2 == client.minimum_version
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
    assert client_ssl_context(None).check_hostname


def test_context_errors(tmp_path: Path) -> None:
    one = create_local_ca(tmp_path / "one", ["127.0.0.1"])
    two = create_local_ca(tmp_path / "two", ["127.0.0.1"])
    with pytest.raises(TlsError, match="no such file"):
        server_ssl_context(tmp_path / "missing.pem", one.server_key)
    with pytest.raises(TlsError, match="cannot use certificate"):
        server_ssl_context(one.server_cert, two.server_key)
    with pytest.raises(TlsError, match="no such CA file"):
        client_ssl_context(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(TlsError, match="not a PEM CA certificate"):
        client_ssl_context(tmp_path / "junk.pem")


async def _echo(connection: ServerConnection) -> None:
    async for message in connection:
        await connection.send(message)


async def _round_trip(server_context: ssl.SSLContext, client_context: ssl.SSLContext,
                      host: str = "127.0.0.1") -> bytes:
    async with serve(_echo, "127.0.0.1", 0, ssl=server_context) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"wss://{host}:{port}", ssl=client_context, open_timeout=10) as client:
            await client.send(b"\x81\xa4type\xa5hello")
            reply = await asyncio.wait_for(client.recv(), 10)
            assert isinstance(reply, bytes)
            return reply


def test_wss_echo_with_the_local_ca(tmp_path: Path) -> None:
    files = create_local_ca(tmp_path, ["127.0.0.1", "localhost"])
    reply = asyncio.run(_round_trip(server_ssl_context(files.server_cert, files.server_key),
                                    client_ssl_context(files.ca_cert)))
    assert reply == b"\x81\xa4type\xa5hello"
    reply = asyncio.run(_round_trip(server_ssl_context(files.server_cert, files.server_key),
                                    client_ssl_context(files.ca_cert), host="localhost"))
    assert reply == b"\x81\xa4type\xa5hello"


def test_client_without_the_ca_fails_verification(tmp_path: Path) -> None:
    files = create_local_ca(tmp_path / "real", ["127.0.0.1"])
    other = create_local_ca(tmp_path / "other", ["127.0.0.1"])
    server = server_ssl_context(files.server_cert, files.server_key)
    for client in (client_ssl_context(None), client_ssl_context(other.ca_cert)):
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            asyncio.run(_round_trip(server, client))


def test_client_checks_the_host_name(tmp_path: Path) -> None:
    files = create_local_ca(tmp_path, ["localhost"])  # not valid for 127.0.0.1
    with pytest.raises(ssl.SSLCertVerificationError, match="127.0.0.1"):
        asyncio.run(_round_trip(server_ssl_context(files.server_cert, files.server_key),
                                client_ssl_context(files.ca_cert)))
