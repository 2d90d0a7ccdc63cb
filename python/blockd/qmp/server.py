"""QMPServer: serves an Engine's QMP to any number of socket connections.

One thread runs a selector over the listening sockets, the client connections and each monitor's
event fd. The C++ Monitor does the protocol (greeting, negotiation, parsing, error replies); this
module only moves bytes. Sockets are non-blocking and every connection has its own output buffer,
so a client that stops reading does not hold up the others. Nothing polls: the thread sleeps in
the selector until a socket or an event fd is ready, or until ``stop()`` wakes it.

    server = QMPServer(engine)
    server.add_unix("/run/blockd/qmp.sock")
    server.add_tcp("127.0.0.1", 0)        # returns the bound (host, port)
    server.start()
    ...
    server.stop()                          # closes connections, removes the unix socket files
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from .. import _core

__all__ = ["QMPServer", "Listener", "format_reply"]

_READ_SIZE = 1 << 16


def format_reply(text: str, pretty: bool) -> bytes:
    """One QMP message as sent on the wire: compact JSON or indented, ended by CRLF as QEMU does."""
    if pretty:
        text = json.dumps(json.loads(text), indent=4)
    return text.encode() + b"\r\n"


@dataclass(eq=False)
class Listener:
    """A listening socket whose connections become QMP monitors."""

    sock: socket.socket
    pretty: bool = False
    # The unix socket file this server created and must remove (with its inode, so that a file
    # someone else put at the same path later is left alone).
    unix_path: str | None = None
    unix_inode: tuple[int, int] | None = None

    @property
    def address(self) -> Any:
        return self.sock.getsockname()


@dataclass(eq=False)
class _Connection:
    sock: socket.socket | None  # None for a pipe pair (stdio)
    read_fd: int
    write_fd: int
    monitor: _core.Monitor
    pretty: bool
    owns_fds: bool = True
    output: bytearray = field(default_factory=bytearray)
    closing: bool = False
    read_closed: bool = False


class QMPServer:
    """Serves ``engine`` (a ``blockd.Engine`` or a ``blockd._core.Engine``) over QMP.

    Args:
        engine: the engine whose monitors the connections open.
        on_quit: called (from the server thread) after a client's ``quit`` was answered.

    All methods may be called from any thread. Connections and listeners added before
    ``start()`` are served once it is called.
    """

    def __init__(self, engine: Any, on_quit: Callable[[], None] | None = None) -> None:
        self._engine: _core.Engine = getattr(engine, "core", engine)
        self._on_quit = on_quit
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._todo: list[Callable[[], None]] = []
        self._listeners: list[Listener] = []
        self._connections: list[_Connection] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = False

    # -- setup --------------------------------------------------------------------------------

    def add_unix(self, path: str | os.PathLike[str], pretty: bool = False) -> Listener:
        """Listens on a new unix socket at ``path`` (which must not exist). Returns the listener;
        its socket file is removed by ``stop()``."""
        path = os.path.abspath(os.fspath(path))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        info = os.stat(path)
        listener = Listener(sock, pretty, unix_path=path, unix_inode=(info.st_dev, info.st_ino))
        self.add_listener(listener)
        return listener

    def add_tcp(self, host: str, port: int, pretty: bool = False) -> Listener:
        """Listens on TCP ``host:port`` (port 0 picks a free one; see ``listener.address``)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        listener = Listener(sock, pretty)
        self.add_listener(listener)
        return listener

    def add_listener(self, listener: Listener) -> None:
        """Serves an already listening socket; the server owns it from now on."""
        listener.sock.setblocking(False)

        def register() -> None:
            self._listeners.append(listener)
            self._selector.register(listener.sock, selectors.EVENT_READ, ("listen", listener))

        self._call(register)

    def add_connection(self, sock: socket.socket, pretty: bool = False) -> None:
        """Serves a connected socket (an accepted client, or a connection we made) as a monitor."""
        self._call(lambda: self._open(sock, sock.fileno(), sock.fileno(), pretty, owns_fds=True))

    def add_pipe(self, read_fd: int, write_fd: int, pretty: bool = False) -> None:
        """Serves a monitor over a pair of file descriptors (such as stdin and stdout), which the
        server neither closes nor owns."""
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._call(lambda: self._open(None, read_fd, write_fd, pretty, owns_fds=False))

    @property
    def listeners(self) -> list[Listener]:
        with self._lock:
            return list(self._listeners)

    def start(self) -> None:
        """Starts the server thread (idempotent)."""
        with self._lock:
            if self._thread is not None or self._stopped:
                return
            self._thread = threading.Thread(target=self._run, name="blockd-qmp-server", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Closes every connection and listener and removes the unix socket files this server
        created; pending replies are written first where the client still reads. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._stopping = True
            thread = self._thread
        self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        elif thread is None:
            self._run_todo()
            self._close_all()

    def __enter__(self) -> QMPServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals: everything below runs on the server thread --------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the thread will wake anyway
        except OSError:
            pass  # the thread has ended and closed the pipe

    def _call(self, work: Callable[[], None]) -> None:
        """Runs ``work`` on the server thread (now, if the thread is not running yet)."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("the QMP server is stopped")
            self._todo.append(work)
        self._wake()

    def _run_todo(self) -> None:
        with self._lock:
            todo, self._todo = self._todo, []
        for work in todo:
            work()

    def _run(self) -> None:
        try:
            while True:
                self._run_todo()
                if self._stopping:
                    break
                for key, mask in self._selector.select():
                    kind, target = key.data
                    if kind == "wake":
                        try:
                            while os.read(self._wake_r, 4096):
                                pass
                        except BlockingIOError:
                            pass
                    elif kind == "listen":
                        self._accept(target)
                    elif kind == "events":
                        self._deliver_events(target)
                    elif kind == "conn":
                        try:
                            if mask & selectors.EVENT_READ:
                                self._read(target)
                            if mask & selectors.EVENT_WRITE:
                                self._flush(target)
                        except Exception as error:  # noqa: BLE001 - one connection's failure
                            # must not take the others down: report it and drop that client.
                            self._report(f"QMP connection dropped after an internal error: {error!r}")
                            self._close(target)
        finally:
            self._run_todo()
            self._close_all()

    @staticmethod
    def _report(message: str) -> None:
        try:
            sys.stderr.write(f"blockd: {message}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    def _accept(self, listener: Listener) -> None:
        while True:
            try:
                sock, _ = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return  # out of resources: leave the client in the backlog
                raise
            self._open(sock, sock.fileno(), sock.fileno(), listener.pretty, owns_fds=True)

    def _open(self, sock: socket.socket | None, read_fd: int, write_fd: int, pretty: bool, owns_fds: bool) -> None:
        if sock is not None:
            sock.setblocking(False)
        monitor = self._engine.open_monitor()
        conn = _Connection(sock, read_fd, write_fd, monitor, pretty, owns_fds)
        self._connections.append(conn)
        conn.output += format_reply(monitor.greeting(), pretty)
        self._selector.register(monitor.event_fd(), selectors.EVENT_READ, ("events", conn))
        if read_fd == write_fd:
            self._selector.register(read_fd, selectors.EVENT_READ, ("conn", conn))
        else:
            self._selector.register(read_fd, selectors.EVENT_READ, ("conn", conn))
        self._flush(conn)

    def _read(self, conn: _Connection) -> None:
        if conn.closing or conn.read_closed:
            return
        try:
            data = conn.sock.recv(_READ_SIZE) if conn.sock is not None else os.read(conn.read_fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        replies = conn.monitor.feed(data)
        for reply in replies:
            conn.output += format_reply(reply, conn.pretty)
        if conn.monitor.wants_close():
            conn.closing = True
        self._flush(conn)
        if conn.closing and self._on_quit is not None and self._engine.wait_shutdown(0.0):
            self._on_quit()

    def _deliver_events(self, conn: _Connection) -> None:
        for event in conn.monitor.take_events():
            conn.output += format_reply(event, conn.pretty)
        self._flush(conn)

    def _flush(self, conn: _Connection) -> None:
        while conn.output:
            try:
                if conn.sock is not None:
                    sent = conn.sock.send(conn.output)
                else:
                    sent = os.write(conn.write_fd, conn.output)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                conn.output.clear()
                self._close(conn)
                return
            del conn.output[:sent]
        if conn.closing and not conn.output:
            self._close(conn)
            return
        self._update_interest(conn)

    def _update_interest(self, conn: _Connection) -> None:
        if conn not in self._connections:
            return
        if conn.read_fd == conn.write_fd:
            mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.output else 0)
            self._selector.modify(conn.read_fd, mask, ("conn", conn))
        else:
            registered = self._selector.get_map().get(conn.write_fd)
            if conn.output and registered is None:
                self._selector.register(conn.write_fd, selectors.EVENT_WRITE, ("conn", conn))
            elif not conn.output and registered is not None:
                self._selector.unregister(conn.write_fd)

    def _close(self, conn: _Connection) -> None:
        if conn not in self._connections:
            return
        self._connections.remove(conn)
        for fd in {conn.read_fd, conn.write_fd, conn.monitor.event_fd()}:
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError):
                pass
        close = getattr(conn.monitor, "close", None)
        if close is not None:
            close()
        if conn.sock is not None:
            conn.sock.close()

    def _close_all(self) -> None:
        for conn in list(self._connections):
            # A last blocking attempt to hand over pending replies (e.g. the reply to quit).
            if conn.output and conn.sock is not None:
                try:
                    conn.sock.settimeout(1.0)
                    conn.sock.sendall(conn.output)
                except OSError:
                    pass
            self._close(conn)
        for listener in self._listeners:
            try:
                self._selector.unregister(listener.sock)
            except (KeyError, ValueError):
                pass
            listener.sock.close()
            remove_unix_socket(listener.unix_path, listener.unix_inode)
        self._listeners.clear()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def remove_unix_socket(path: str | None, inode: tuple[int, int] | None) -> None:
    """Removes the socket file at ``path`` if it is still the one identified by ``inode``."""
    if path is None:
        return
    try:
        info = os.lstat(path)
    except OSError:
        return
    if stat.S_ISSOCK(info.st_mode) and (inode is None or (info.st_dev, info.st_ino) == inode):
        try:
            os.unlink(path)
        except OSError:
            pass
