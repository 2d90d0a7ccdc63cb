"""blockd.Engine: the block engine in this process."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from . import _core
from ._args import qmp_arguments
from .errors import ProtocolError, execute_error, raise_for_response
from .events import EventQueue

__all__ = ["Engine", "qmp_arguments"]


class Engine:
    """The blockd engine, running in this process.

    Creating one starts the engine's main loop thread. Send it QMP commands with ``qmp()`` (no
    capabilities negotiation is needed), read its events from ``events``. ``close()`` (or leaving
    the ``with`` block) stops the exports, drains and flushes every node and stops its threads.

    Every call releases the GIL while the engine works, so other Python threads keep running.
    ``qmp()`` may be called from several threads; ``events`` is meant for one thread at a time.
    """

    def __init__(self) -> None:
        self._core: _core.Engine | None = _core.Engine()
        self._lock = threading.Lock()
        self.events = EventQueue(self._next_event)

    @property
    def core(self) -> _core.Engine:
        """The compiled engine object (for QMPServer and the daemon). Raises once closed."""
        core = self._core
        if core is None:
            raise ProtocolError("the engine is closed")
        return core

    @property
    def closed(self) -> bool:
        return self._core is None

    def _next_event(self, timeout: float) -> str | None:
        return self.core.next_event(timeout)

    def execute(self, request: Mapping[str, Any] | str) -> dict[str, Any]:
        """Sends one QMP request and returns the whole reply object, errors included.

        ``request`` is a dict such as ``{"execute": "query-version", "id": 1}``, or JSON text (which
        need not be valid: the reply then is the error QMP gives for it).
        """
        text = request if isinstance(request, str) else json.dumps(request)
        reply: dict[str, Any] = json.loads(self.core.execute(text))
        return reply

    def qmp(self, command: str, arguments: Mapping[str, Any] | None = None, /, **kwargs: Any) -> Any:
        """Runs a QMP command and returns its ``return`` value.

        ``engine.qmp("blockdev-add", driver="null-co", node_name="n0")`` and
        ``engine.qmp("blockdev-add", {"driver": "null-co", "node-name": "n0"})`` are the same
        command: keyword names get ``_`` turned into ``-`` (top level only; see qmp_arguments).

        Raises an ExecuteError subclass (GenericError, CommandNotFound, DeviceNotFound, ...) that
        carries the reply's ``error_class`` and ``desc``.
        """
        request: dict[str, Any] = {"execute": command}
        args = qmp_arguments(arguments, kwargs)
        if args:
            request["arguments"] = args
        return raise_for_response(self.execute(request), command=command)

    def cli_option(self, kind: str, value: str | Mapping[str, Any]) -> None:
        """Applies a qemu-storage-daemon option (``"blockdev"``, ``"object"``, ``"nbd-server"`` or
        ``"export"``) given as a dict or as JSON text, like ``--blockdev '{"driver": ...}'``.

        Raises ExecuteError on failure.
        """
        text = value if isinstance(value, str) else json.dumps(value)
        try:
            self.core.cli_option(kind, text, False)
        except _core.Error as error:
            raise execute_error(error.error_class, error.desc, command=f"--{kind}") from None

    def wait_shutdown(self, timeout: float | None = None) -> bool:
        """Waits until a QMP ``quit`` was received; True if it was, False after ``timeout``."""
        return self.core.wait_shutdown(timeout)

    def close(self) -> None:
        """Stops exports, drains and flushes every node and stops the engine. Idempotent."""
        with self._lock:
            core, self._core = self._core, None
        if core is not None:
            core.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # The compiled engine shuts down in its destructor as well; this only makes the order
        # explicit when an Engine is dropped without close().
        core = getattr(self, "_core", None)
        if core is not None:
            try:
                core.shutdown()
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"<blockd.Engine {'closed' if self.closed else 'running'}>"
