"""What the coordinator serves to people and monitoring, beside the protocol: its page
(``GET /``), ``/status``, ``/metrics`` and the page's live feed (a websocket at ``/live``).

All of it goes through the websocket server's ``process_request`` hook, on the port (and
TLS) the clients use: no second server, and nothing to install or build. The page is
three static files shipped in the package (``coordinator/static``); the feed pushes a
JSON snapshot of the federation when it changes (at most every
:data:`MIN_PUSH_INTERVAL_S`, and every :data:`HEARTBEAT_S` regardless), so an open page
costs the coordinator one JSON dump per change, not a poll per second per viewer.

Why a websocket and not server-sent events: websockets' ``process_request`` answers
plain HTTP with one complete response, so a streamed SSE body would need a second HTTP
server; the websocket is already here.

Reading is guarded, because the page and ``/status`` show who takes part:

* with a read token (``[server] read_token``; generated at start in allow-list mode when
  none is configured), ``/``, ``/status``, ``/metrics`` and ``/live`` answer 401 unless
  the request carries it, as ``?token=`` or ``Authorization: Bearer``; the page's script
  and stylesheet hold no data and are served to anyone;
* ``/live`` refuses (403) an upgrade whose ``Origin`` is another site's, since browsers
  let any page open a websocket to any host (cross-site websocket hijacking);
* the page sets a Content-Security-Policy that runs only its own script, and the script
  writes every client-supplied string as text, never as markup.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from coordinator.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

__all__ = ["ChangeFeed", "Dashboard", "LIVE_PATH"]

logger = logging.getLogger(__name__)

LIVE_PATH = "/live"
MIN_PUSH_INTERVAL_S = 0.25  # coalesce bursts of changes (a round's updates arrive together)
HEARTBEAT_S = 5.0  # push at least this often (uptime, deadlines), changed or not
SEND_TIMEOUT_S = 10.0  # a page that does not read its feed within this is dropped
MAX_VIEWERS = 32  # open live pages; more are refused (each costs a JSON dump per change)

# The page's own files only; 'self' covers the same-origin ws:/wss: feed in CSP 3.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
STATIC_FILES = {  # path -> (file in coordinator/static, content type)
    "/": ("dashboard.html", "text/html; charset=utf-8"),
    "/index.html": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
PUBLIC_PATHS = frozenset({"/dashboard.js", "/dashboard.css"})  # code, no data: no token needed


class ChangeFeed:
    """A version number that waiters can follow: the coordinator bumps it on every change
    a page shows; each live connection waits for it to move."""

    def __init__(self) -> None:
        self.version = 0
        self._moved = asyncio.Event()

    def bump(self) -> None:
        self.version += 1
        self._moved.set()
        self._moved = asyncio.Event()  # later waiters wait for the next change

    async def wait_past(self, version: int, timeout: float) -> None:
        """Return once the version is past ``version``, or after ``timeout`` seconds."""
        if self.version != version:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._moved.wait()


class Dashboard:
    """Routes the coordinator's plain HTTP requests and serves the live feed.

    Args:
        status: the ``/status`` object now.
        snapshot: the page's snapshot now (``/status`` plus config, history, ledger head).
        metrics: the ``/metrics`` body now.
        feed: bumped by the coordinator on every change.
        read_token: the token reads need; None: reads are open.
    """

    def __init__(self, *, status: Callable[[], dict[str, Any]], snapshot: Callable[[], dict[str, Any]],
                 metrics: Callable[[], bytes], feed: ChangeFeed, read_token: str | None) -> None:
        self._status = status
        self._snapshot = snapshot
        self._metrics = metrics
        self.feed = feed
        self.read_token = read_token
        self.viewers = 0
        self._files: dict[str, bytes] = {}

    # -- plain HTTP ---------------------------------------------------------------------

    def respond(self, connection: ServerConnection, request: Request) -> Response | None:
        """The response to a plain GET, or None to go on with a websocket upgrade."""
        parts = urlsplit(request.path)
        path = parts.path
        upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
        if upgrade and path != LIVE_PATH and path not in ("/status", "/status/", "/metrics"):
            return None  # a client's websocket upgrade: any other path, "/" included (PROTOCOL.md §2)
        if path in PUBLIC_PATHS:
            return self._file(path)
        known = path in STATIC_FILES or path in ("/status", "/status/", "/metrics", LIVE_PATH)
        if not known:
            return None  # websockets answers a plain GET elsewhere with 426
        if not self._authorised(request, parts.query):
            return _response(HTTPStatus.UNAUTHORIZED, b"a read token is required: ?token=... or "
                             b"Authorization: Bearer ...\n", "text/plain; charset=utf-8",
                             [("WWW-Authenticate", 'Bearer realm="edgefed"')])
        if path == LIVE_PATH:
            return self._check_live(request)
        if path in STATIC_FILES:
            return self._file(path)
        if path == "/metrics":
            return _response(HTTPStatus.OK, self._metrics(), METRICS_CONTENT_TYPE)
        return _response(HTTPStatus.OK, json.dumps(self._status(), indent=2).encode(), "application/json")

    def _authorised(self, request: Request, query: str) -> bool:
        if self.read_token is None:
            return True
        offered = parse_qs(query).get("token", [None])[0]
        header = request.headers.get("Authorization", "")
        if offered is None and header.lower().startswith("bearer "):
            offered = header[7:].strip()
        # compare_digest: how long a wrong token took to refuse says nothing about the right one.
        return offered is not None and hmac.compare_digest(offered.encode(), self.read_token.encode())

    def _check_live(self, request: Request) -> Response | None:
        """Refuse a feed upgrade from another site's page, or beyond the viewer cap."""
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("Host"):
            logger.warning("refused a live-page connection from origin %r", origin[:100])
            return _response(HTTPStatus.FORBIDDEN, b"cross-origin feed refused\n", "text/plain; charset=utf-8")
        if self.viewers >= MAX_VIEWERS:
            return _response(HTTPStatus.SERVICE_UNAVAILABLE, b"too many open pages\n", "text/plain; charset=utf-8")
        return None  # upgrade: the server's handler calls serve_live

    def _file(self, path: str) -> Response:
        name, content_type = STATIC_FILES[path]
        body = self._files.get(name)
        if body is None:
            body = resources.files("coordinator").joinpath("static", name).read_bytes()
            self._files[name] = body
        return _response(HTTPStatus.OK, body, content_type,
                         [("Content-Security-Policy", CONTENT_SECURITY_POLICY)] if name.endswith(".html") else [])

    # -- the live feed ------------------------------------------------------------------

    async def serve_live(self, connection: ServerConnection) -> None:
        """Push snapshots to one page until it goes away."""
        self.viewers += 1
        last_sent = 0.0
        try:
            while True:
                version = self.feed.version
                frame = json.dumps(self._snapshot(), separators=(",", ":"))
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    await connection.send(frame)
                last_sent = time.monotonic()
                await self.feed.wait_past(version, HEARTBEAT_S)
                pause = MIN_PUSH_INTERVAL_S - (time.monotonic() - last_sent)
                if pause > 0:
                    await asyncio.sleep(pause)
        except TimeoutError:
            logger.info("dropping a live page that does not read its feed")
            connection.transport.abort()
        except ConnectionClosed:
            pass
        finally:
            self.viewers -= 1


def _response(status: HTTPStatus, body: bytes, content_type: str,
              extra: list[tuple[str, str]] | None = None) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                       ("Referrer-Policy", "no-referrer"), ("Connection", "close"), *(extra or [])])
    return Response(status.value, status.phrase, headers, body)
