"""Hosting a federation from an app: :class:`Coordinator`.

The same server ``edgefed-coordinator`` runs (:class:`coordinator.server.Coordinator`),
with the same configuration: a TOML file, or the same tables as a dict, plus keyword
overrides named like :class:`coordinator.config.FederationConfig`'s fields::

    with Coordinator({"model": {"hash": base_hash}, "federation": {"rounds": 5}}, port=0) as host:
        print(host.url)             # ws://127.0.0.1:<port>
        host.wait()                 # until the rounds are committed
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coordinator.allowlist import load_allowlist
from coordinator.config import FederationConfig, config_from_document, load_config
from coordinator.ledger import Ledger
from coordinator.server import Coordinator as _Server
from coordinator.tls import server_ssl_context
from edgefed._background import BackgroundRunner

__all__ = ["Coordinator"]


class Coordinator:
    """A federation's coordinator, started and stopped by an app.

    Args:
        config: a TOML file's path, the TOML's tables as a dict (``{"federation": {...},
            "model": {...}, "training": {...}, "rounds": {...}, "modes": {...}}``), a
            :class:`~coordinator.config.FederationConfig`, or None (overrides only).
        **overrides: FederationConfig fields, e.g. ``model_hash=...``, ``rounds=5``,
            ``port=0`` (any free port; read :attr:`port` once started).

    Raises:
        coordinator.config.ConfigError: an unknown key, a bad value, no model hash.
    """

    def __init__(self, config: str | os.PathLike[str] | Mapping[str, Any] | FederationConfig | None = None,
                 **overrides: Any) -> None:
        if isinstance(config, FederationConfig):
            self.config = dataclasses.replace(config, **overrides) if overrides else config
        elif isinstance(config, Mapping):
            self.config = config_from_document(config, overrides)
        else:
            self.config = load_config(Path(config) if config is not None else None, overrides)
        self._server: _Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listening = threading.Event()
        self._runner = BackgroundRunner("edgefed-coordinator", self.run, on_exit=self._listening.set)

    @property
    def port(self) -> int | None:
        """The port it listens on, once listening."""
        return self._server.port if self._server is not None else None

    @property
    def url(self) -> str | None:
        """``ws://`` (or ``wss://``) host and port for clients, once listening."""
        if self.port is None:
            return None
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"{'wss' if self.config.tls_cert else 'ws'}://{host}:{self.port}"

    @property
    def finished(self) -> bool:
        """True once every configured round is committed."""
        return self._server is not None and self._server.finished

    def status(self) -> dict[str, Any]:
        """What ``GET /status`` returns: round, clients, recent rounds."""
        server = self._server
        if server is None:
            return {}
        if server.final_status is not None:
            return server.final_status
        loop = self._loop
        if loop is None or loop.is_closed() or self._runner.is_current():
            return server.status()
        # Read on the server's own thread: its state changes there.
        status: dict[str, Any] = asyncio.run_coroutine_threadsafe(_call(server.status), loop).result(timeout=30)
        return status

    async def run(self) -> None:
        """Serve until the rounds are committed or :meth:`stop` is called."""
        config = self.config
        allowlist = load_allowlist(config.allowlist) if config.allowlist else None
        ssl_context = (server_ssl_context(config.tls_cert, config.tls_key)
                       if config.tls_cert is not None and config.tls_key is not None else None)
        with Ledger(config.ledger_path) as ledger:
            self._server = _Server(config, ledger, allowlist=allowlist, ssl_context=ssl_context)
            self._loop = asyncio.get_running_loop()
            runner = asyncio.create_task(self._server.run())
            while self._server.port is None and not runner.done():
                await asyncio.sleep(0.02)
            self._listening.set()
            await runner

    def start(self, timeout: float = 60.0) -> None:
        """Start serving in a background thread; returns once it listens (:attr:`url`).

        Raises:
            whatever stopped it from listening (a port in use, a bad ledger).
        """
        self._runner.start("coordinator")
        self._listening.wait(timeout)
        if self.port is None:
            self._runner.join(timeout)
            self._runner.raise_error()
            raise TimeoutError(f"the coordinator did not start listening within {timeout}s")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until it stops serving (the rounds are committed, or :meth:`stop`).

        Returns:
            True when it stopped, False on timeout.
        """
        return self._runner.wait("coordinator", timeout)

    def stop(self, timeout: float | None = 60.0) -> None:
        """Stop serving (clients get a goodbye), close the ledger, join the thread. Safe
        from any thread, and more than once."""
        server, loop = self._server, self._loop
        if server is not None and loop is not None and not loop.is_closed():
            if self._runner.is_current():
                server.stop()
            else:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(server.stop)
        self._runner.join(timeout)

    def __enter__(self) -> Coordinator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


async def _call(function: Any) -> Any:
    return function()
