"""One coroutine run in a thread of its own, for apps without an event loop (the
``start()``/``wait()``/``stop()`` half of :class:`edgefed.Client` and
:class:`edgefed.Coordinator`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["BackgroundRunner"]


class BackgroundRunner:
    """Runs ``main()`` with ``asyncio.run`` in a daemon thread named ``name``; an error
    that ends it is kept for :meth:`wait` (a thread has nowhere else to raise)."""

    def __init__(self, name: str, main: Callable[[], Coroutine[Any, Any, None]],
                 on_exit: Callable[[], None] | None = None) -> None:
        self.name = name
        self._main = main
        self._on_exit = on_exit
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self, what: str) -> None:
        if self._thread is not None:
            raise RuntimeError(f"this {what} was already started")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:
            self._error = error
        finally:
            if self._on_exit is not None:
                self._on_exit()

    def is_current(self) -> bool:
        """True on the runner's own thread."""
        return threading.current_thread() is self._thread

    def raise_error(self) -> None:
        """Raise (once) the error that ended the thread, if any."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait(self, what: str, timeout: float | None) -> bool:
        """Join the thread: True when it ended (raising its error, if any), False on timeout."""
        if self._thread is None:
            raise RuntimeError(f"start() the {what} first")
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self.raise_error()
        return True

    def join(self, timeout: float | None) -> bool:
        """Join the thread unless called from it; True when it is not running."""
        if self._thread is None:
            return True
        if not self.is_current():
            self._thread.join(timeout)
        return not self._thread.is_alive()
