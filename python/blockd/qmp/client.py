"""QMPClient: a synchronous QMP client for unix and TCP sockets, in the manner of QEMU's iotests.

    with QMPClient("/run/blockd/qmp.sock") as qmp:
        qmp.command("blockdev-add", driver="null-co", node_name="n0")
        reply = qmp.cmd("query-named-block-nodes", flat=True)   # the whole reply dict
        event = qmp.event_wait("BLOCK_EXPORT_DELETED", match={"data": {"id": "e0"}})

It works with blockd-daemon and with qemu-storage-daemon alike. Events that arrive while a
command is waiting for its reply are kept in order for ``get_events()`` and ``event_wait()``.
"""

from __future__ import annotations

import collections
import json
import os
import select
import socket
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Union

from .._args import qmp_arguments
from ..errors import ConnectionClosed, ProtocolError, raise_for_response
from ..events import Event, match_event
from ._stream import JSONSplitter

__all__ = ["QMPClient", "Address", "parse_address"]

Address = Union[str, "os.PathLike[str]", tuple[str, int]]


def parse_address(address: Address) -> tuple[int, Any]:
    """Returns (socket family, address) for a unix path, a ``(host, port)`` tuple or a
    ``"host:port"`` string (a string containing a ``/`` is always a path)."""
    if isinstance(address, tuple):
        host, port = address
        return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))
    text = os.fspath(address)
    if "/" not in text and ":" in text:
        host, _, port = text.rpartition(":")
        if port.isdigit():
            host = host.strip("[]")
            return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))
    return socket.AF_UNIX, text


class QMPClient:
    """A QMP connection.

    Args:
        address: a unix socket path, ``(host, port)``, or ``"host:port"``.
        negotiate: send ``qmp_capabilities`` right after the greeting (default True).
        timeout: how long (seconds) ``cmd()`` waits for a reply; None waits forever.
        connect: connect now (default) or leave it to an explicit ``connect()``.

    Not thread-safe: one thread per client.
    """

    def __init__(
        self,
        address: Address,
        *,
        negotiate: bool = True,
        timeout: float | None = 60.0,
        connect: bool = True,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.greeting: dict[str, Any] | None = None
        self._negotiate = negotiate
        self._sock: socket.socket | None = None
        self._splitter = JSONSplitter()
        self._pending: collections.deque[Any] = collections.deque()
        self._events: collections.deque[Event] = collections.deque()
        self._replies: collections.deque[Any] = collections.deque()
        if connect:
            self.connect()

    # -- connection ---------------------------------------------------------------------------

    def connect(self) -> dict[str, Any]:
        """Connects, reads the greeting and (unless negotiate=False) negotiates capabilities.

        Returns the greeting. Raises OSError if the connection fails, ProtocolError if the peer
        does not greet like a QMP server.
        """
        family, sockaddr = parse_address(self.address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.connect(sockaddr)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        greeting = self._read_message(self.timeout)
        if not isinstance(greeting, dict) or "QMP" not in greeting:
            self.close()
            raise ProtocolError(f"expected a QMP greeting, got {greeting!r}")
        self.greeting = greeting
        if self._negotiate:
            self._negotiate_capabilities()
        return greeting

    def _negotiate_capabilities(self) -> None:
        """Sends qmp_capabilities and waits for its reply.

        qemu-storage-daemon 7.2 sometimes greets twice when a client connects while it is still
        setting up its monitor (about one start in a hundred); the extra greeting comes before
        the reply and is skipped here.
        """
        self.send_raw(b'{"execute": "qmp_capabilities"}\n')
        reply = self.read_response()
        while isinstance(reply, dict) and "QMP" in reply:
            reply = self.read_response()
        raise_for_response(reply, command="qmp_capabilities")

    def close(self) -> None:
        """Closes the connection (idempotent). Queued events stay readable."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def fileno(self) -> int:
        return self._socket().fileno()

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionClosed("not connected")
        return self._sock

    # -- raw messages -------------------------------------------------------------------------

    def send_raw(self, data: bytes | str) -> None:
        """Sends bytes as they are (for protocol tests: malformed JSON, partial requests)."""
        if isinstance(data, str):
            data = data.encode()
        try:
            self._socket().sendall(data)
        except (BrokenPipeError, ConnectionResetError) as error:
            self.close()
            raise ConnectionClosed(f"the QMP peer closed the connection ({error.strerror})") from error

    def _receive(self, timeout: float | None) -> bool:
        """Reads what the socket has; False if nothing came within ``timeout``."""
        sock = self._socket()
        if timeout is not None:
            readable, _, _ = select.select([sock], [], [], max(0.0, timeout))
            if not readable:
                return False
        try:
            data = sock.recv(1 << 16)
        except ConnectionResetError as error:
            self.close()
            raise ConnectionClosed("the QMP peer reset the connection") from error
        if not data:
            self.close()
            raise ConnectionClosed("the QMP peer closed the connection")
        for text in self._splitter.feed(data):
            try:
                self._pending.append(json.loads(text))
            except ValueError as error:
                raise ProtocolError(f"the QMP peer sent invalid JSON: {text[:200]!r}") from error
        return True

    def _read_message(self, timeout: float | None) -> Any:
        """The next message (reply or event), or raises TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._pending:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining < 0:
                raise TimeoutError(f"no QMP message from {self.address} within {timeout} s")
            self._receive(remaining)
        return self._pending.popleft()

    @staticmethod
    def _is_event(message: Any) -> bool:
        return isinstance(message, dict) and "event" in message

    def read_response(self, timeout: float | None = None) -> Any:
        """Returns the next message that is not an event, queueing events met on the way.

        ``timeout`` defaults to the client's timeout; raises TimeoutError when it passes.
        """
        if self._replies:
            return self._replies.popleft()
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            message = self._read_message(remaining)
            if self._is_event(message):
                self._events.append(message)
            else:
                return message

    # -- commands -----------------------------------------------------------------------------

    def cmd_obj(self, request: Any) -> Any:
        """Sends any JSON value as one request and returns the next reply as decoded JSON.

        The request is sent as given (it need not even be an object), so tests can send ids of
        any type or malformed requests.
        """
        self.send_raw(json.dumps(request).encode() + b"\n")
        return self.read_response()

    def cmd(self, name: str, arguments: Mapping[str, Any] | None = None, /, **kwargs: Any) -> dict[str, Any]:
        """Runs a command and returns the whole reply (``{"return": ...}`` or ``{"error": ...}``).

        Keyword names have ``_`` turned into ``-``, as in ``Engine.qmp``.
        """
        request: dict[str, Any] = {"execute": name}
        args = qmp_arguments(arguments, kwargs)
        if args:
            request["arguments"] = args
        reply = self.cmd_obj(request)
        if not isinstance(reply, dict):
            raise ProtocolError(f"reply to {name} is not an object: {reply!r}")
        return reply

    def command(self, name: str, arguments: Mapping[str, Any] | None = None, /, **kwargs: Any) -> Any:
        """Runs a command and returns its ``return`` value; raises ExecuteError on an error."""
        return raise_for_response(self.cmd(name, arguments, **kwargs), command=name)

    # -- events -------------------------------------------------------------------------------

    def _sort_pending(self) -> None:
        """Moves received messages to the event queue or the reply queue."""
        while self._pending:
            message = self._pending.popleft()
            (self._events if self._is_event(message) else self._replies).append(message)

    def _pull_events(self, timeout: float | None) -> None:
        """Queues the events that have arrived; if there are none yet, waits up to ``timeout``
        seconds (None: forever) for the first."""
        self._sort_pending()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._events:
                wait: float | None = 0.0
            else:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._receive(wait):
                return
            self._sort_pending()

    def get_events(self, wait: bool | float = False) -> list[Event]:
        """Returns and clears the queued events.

        ``wait=False`` returns what has arrived; ``wait=True`` blocks until at least one event
        arrived; a number waits up to that many seconds for the first.
        """
        if wait is True:
            while not self._events:
                self._pull_events(None)
        else:
            self._pull_events(0.0 if wait is False else float(wait))
        events = list(self._events)
        self._events.clear()
        return events

    def event_wait(self, name: str, timeout: float | None = 60.0, match: dict[str, Any] | None = None) -> Event:
        """Waits for the first event ``name`` that matches ``match`` and removes it from the queue.

        Other events stay queued. Raises TimeoutError after ``timeout`` seconds (None: forever).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._sort_pending()
        checked = 0
        while True:
            for index in range(checked, len(self._events)):
                event = self._events[index]
                if event.get("event") == name and match_event(event, match):
                    del self._events[index]
                    return event
            checked = len(self._events)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"no {name} event matching {match!r} within {timeout} s")
            self._receive(remaining)
            self._sort_pending()

    def clear_events(self) -> None:
        """Discards the queued events."""
        self.get_events(wait=False)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "closed"
        return f"<QMPClient {self.address} {state}>"
