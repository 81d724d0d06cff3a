"""``edgefed-keys``: client keys, the coordinator's allow-list, and TLS certificates.

Subcommands::

    edgefed-keys new --out client.key [--name CLIENT_ID]   create a client key (mode 0600)
    edgefed-keys show client.key [--name CLIENT_ID]        print its allow-list line
    edgefed-keys allow --allowlist allow.txt --name CLIENT_ID PUBLIC_KEY
    edgefed-keys list --allowlist allow.txt
    edgefed-keys tls-init --dir certs --host 192.168.1.10 --host coordinator.lan

``new`` and ``show`` print the line ``<base64 public key> <client id>`` on stdout, ready
for the coordinator's allow-list; everything else they say goes to stderr, so
``edgefed-keys show client.key --name laptop-1 >> allow.txt`` works too. Bad input is
reported in one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NoReturn

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.allowlist import AllowlistError, add, format_entry, load_allowlist
from coordinator.tls import DEFAULT_DAYS, TlsError, create_local_ca, read_private_file, write_private_file
from protocol.keyfile import KeyFileError, parse_ed25519_private_key, private_key_pem

__all__ = ["main", "build_parser"]

PROG = "edgefed-keys"

# How the other commands are told about the files; keep in step with their options.
COORDINATOR_TLS_HINT = "edgefed-coordinator ... --tls-cert {cert} --tls-key {key}"
CLIENT_TLS_HINT = "edgefed-client --url wss://{host}:8765 --ca-file ca.pem ..."

_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}", re.ASCII)


class _Usage(Exception):
    """Bad command-line usage (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reports errors in one line and raises instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise _Usage(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``edgefed-keys``."""
    parser = _Parser(prog=PROG, description="Client keys, the coordinator's allow-list, and TLS certificates.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    new = commands.add_parser("new", help="create a client key file (Ed25519, mode 0600) and print its public key")
    new.add_argument("--out", required=True, type=Path, help="the key file to create (never overwritten)")
    new.add_argument("--name", help="the client id for the printed line (default: the file name without suffix)")

    show = commands.add_parser("show", help="print a key file's allow-list line")
    show.add_argument("keyfile", type=Path, help="a client key file")
    show.add_argument("--name", help="the client id for the printed line (default: the file name without suffix)")

    allow = commands.add_parser("allow", help="add a public key to an allow-list (created if absent)")
    allow.add_argument("--allowlist", required=True, type=Path, help="the allow-list file")
    allow.add_argument("--name", required=True, help="the client id the key may use")
    allow.add_argument("public_key", metavar="PUBLIC_KEY", help="base64 of the 32-byte Ed25519 public key")

    listing = commands.add_parser("list", help="print the entries of an allow-list")
    listing.add_argument("--allowlist", required=True, type=Path, help="the allow-list file")

    tls = commands.add_parser("tls-init", help="create a local CA and a server certificate for the coordinator")
    tls.add_argument("--dir", required=True, type=Path, help="where to write ca.pem, ca.key, server.pem, server.key")
    tls.add_argument("--host", action="append", required=True, dest="hosts", metavar="HOST",
                     help="an IP address or DNS name clients will connect to (repeat for several)")
    tls.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity in days (default {DEFAULT_DAYS})")
    tls.add_argument("--force", action="store_true", help="replace existing files")
    return parser


def _default_name(path: Path) -> str:
    """The file name without its suffix, if it is a valid client id, else ``client``."""
    stem = path.name.split(".")[0]
    return stem if _ID.fullmatch(stem) else "client"


def _name(given: str | None, path: Path) -> str:
    """The client id to print: ``given`` (checked) or the default for ``path``.

    Raises:
        _Usage: ``given`` is not a valid client id.
    """
    if given is None:
        return _default_name(path)
    if not _ID.fullmatch(given):
        raise _Usage(f"--name {given!r} must be 1 to 64 characters of [A-Za-z0-9_.-] (the client id)")
    return given


def _load_client_key(path: Path) -> Ed25519PrivateKey:
    """Read a client key file, by the rules the client itself loads it with.

    Raises:
        KeyFileError: the file is unreadable, too open, or not such a key.
    """
    return parse_ed25519_private_key(path, read_private_file(path))


def _public_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _new(args: argparse.Namespace) -> None:
    name = _name(args.name, args.out)
    key = Ed25519PrivateKey.generate()
    write_private_file(args.out, private_key_pem(key))
    print(format_entry(_public_bytes(key), name))
    print(f"{PROG}: wrote {args.out} (mode 0600; keep it private). Add the line above to the coordinator's "
          f"allow-list; its name must be the client's --client-id.", file=sys.stderr)


def _show(args: argparse.Namespace) -> None:
    name = _name(args.name, args.keyfile)
    print(format_entry(_public_bytes(_load_client_key(args.keyfile)), name))


def _allow(args: argparse.Namespace) -> None:
    entry = add(args.allowlist, args.public_key, args.name)
    print(f"{PROG}: added {entry.name!r} to {args.allowlist} (line {entry.line})", file=sys.stderr)


def _list(args: argparse.Namespace) -> None:
    allowlist = load_allowlist(args.allowlist)
    for entry in allowlist:
        print(format_entry(entry.public_key, entry.name))
    print(f"{PROG}: {len(allowlist)} key(s) in {args.allowlist}", file=sys.stderr)


def _tls_init(args: argparse.Namespace) -> None:
    files = create_local_ca(args.dir, args.hosts, args.days, overwrite=args.force)
    first = files.hosts[0]
    host = f"[{first}]" if ":" in first else first
    print(f"wrote {files.ca_cert}      CA certificate: copy it to every client")
    print(f"      {files.ca_key}      CA private key: keep it private on this machine (mode 0600)")
    print(f"      {files.server_cert}  server certificate for {', '.join(files.hosts)} ({args.days} days)")
    print(f"      {files.server_key}  server private key (mode 0600)")
    print("coordinator: " + COORDINATOR_TLS_HINT.format(cert=files.server_cert, key=files.server_key))
    print("clients:     " + CLIENT_TLS_HINT.format(host=host))


_COMMANDS = {"new": _new, "show": _show, "allow": _allow, "list": _list, "tls-init": _tls_init}


def main(argv: list[str] | None = None) -> int:
    """Run ``edgefed-keys`` with ``argv`` (default: the process's arguments).

    Returns:
        0 on success; 2 on bad usage or input, after a one-line message on stderr.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _COMMANDS[args.command](args)
    except _Usage as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as stop:  # --help
        return stop.code if isinstance(stop.code, int) else 0
    except (TlsError, KeyFileError, AllowlistError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{PROG}: {error.filename + ': ' if error.filename else ''}{error.strerror or error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
