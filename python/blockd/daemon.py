"""blockd-daemon: the engine as a qemu-storage-daemon compatible process.

    blockd-daemon --blockdev file,node-name=f0,filename=disk.img \\
                  --chardev socket,id=qmp0,path=/tmp/qmp.sock,server=on,wait=off \\
                  --monitor chardev=qmp0

The options are qemu-storage-daemon's, with the same syntax, and they are applied in the order
given. Like qemu-storage-daemon the command line is read twice: the first pass reports unknown
options and handles -h/-V (and notes --daemonize and --pidfile), the second applies the options.

Exit status: 0 after -h, -V, SIGTERM, SIGINT, SIGHUP or QMP ``quit``; 1 when an option fails (the
message names the option; sockets this process created are removed and no pidfile is left).
On the way out the daemon stops its exports, drains and flushes every node, and removes its unix
sockets and pidfile.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TextIO

from . import __version__
from .cli import (
    ChardevOptions,
    Option,
    OptionError,
    parse_argv,
    parse_chardev,
    parse_monitor,
)

__all__ = ["main", "PROGRAM"]

PROGRAM = "blockd-daemon"

# kind of option -> the key an option may leave out in keyval syntax
ENGINE_OPTIONS: dict[str, str | None] = {
    "blockdev": "driver",
    "object": "qom-type",
    "nbd-server": None,
    "export": "type",
}

HELP = f"""\
Usage: {PROGRAM} [options]
blockd, a block storage engine with qemu-storage-daemon's command line

  -h, --help             print this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         accepted for compatibility; blockd has no trace events
  -V, --version          print the version and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         add a block node (also as JSON: --blockdev '{{"driver": ...}}')

  --chardev socket,id=<id>,path=<path>[,server=on|off][,wait=on|off]
  --chardev socket,id=<id>,host=<host>,port=<port>[,server=on|off][,wait=on|off]
  --chardev stdio,id=<id>
                         a character device for a monitor

  --daemonize            run in the background; the foreground process exits
                         once the daemon is ready

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export a block node (needs --nbd-server for NBD)
  --export [type=]fuse,id=<id>,node-name=<node-name>,mountpoint=<file>
           [,growable=on|off][,writable=on|off][,allow-other=on|off|auto]
                         export a block node as a regular file (FUSE)
  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,addr.type=unix,
           addr.path=<socket-path>[,writable=on|off][,logical-block-size=<block-size>]
           [,num-queues=<num-queues>]
                         export a block node to a VM's vhost-user-blk device

  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                         serve QMP on a character device

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start the NBD server

  --object help          list the object types blockd can create
  --object <type>,help   list the properties of an object type
  --object <type>,id=<id>[,<property>=<value>...]
                         create an object, such as an iothread

  --pidfile <path>       write the process id to <path> once started (the file
                         is locked while the daemon runs and removed at exit)

Options are applied in the order given. SIGTERM, SIGINT, SIGHUP and the QMP
command 'quit' stop the daemon cleanly.
"""


class Terminated(Exception):
    """A termination signal arrived while the daemon was still starting."""


def _print_error(location: str | None, message: str, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    prefix = f"{PROGRAM}: {location}: " if location else f"{PROGRAM}: "
    stream.write(prefix + message + "\n")
    stream.flush()


@dataclass(eq=False)
class Chardev:
    """A character device made by --chardev; a --monitor serves QMP on it."""

    options: ChardevOptions
    location: str
    sock: socket.socket | None = None  # listening socket (server=on)
    connection: socket.socket | None = None  # connected socket (server=off, or wait=on)
    unix_path: str | None = None
    unix_inode: tuple[int, int] | None = None
    in_use: bool = False

    def close(self) -> None:
        from .qmp.server import remove_unix_socket

        for sock in (self.connection, self.sock):
            if sock is not None:
                sock.close()
        self.connection = self.sock = None
        remove_unix_socket(self.unix_path, self.unix_inode)


def _resolve(host: str, port: str, options: ChardevOptions, passive: bool) -> list[Any]:
    family = socket.AF_UNSPEC
    if options.ipv4 and not options.ipv6:
        family = socket.AF_INET
    elif options.ipv6 and not options.ipv4:
        family = socket.AF_INET6
    try:
        return socket.getaddrinfo(
            host or None, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE if passive else 0
        )
    except socket.gaierror as error:
        raise OptionError(f"address resolution failed for {host}:{port}: {error.strerror}") from None


def _bind_unix(path: str) -> socket.socket:
    """Binds a listening unix socket at ``path``. A stale socket file (nobody listening) is
    replaced, as QEMU does; a live one is an error."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISSOCK(info.st_mode):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(16)
    except OSError as error:
        sock.close()
        raise OptionError(f"Failed to bind socket to {path}: {error.strerror}") from None
    return sock


def open_chardev(options: ChardevOptions, location: str, warn: Callable[[str], None]) -> Chardev:
    """Creates the socket of a --chardev option. Raises OptionError."""
    chardev = Chardev(options, location)
    if options.backend == "stdio":
        return chardev
    try:
        if options.path is not None:
            path = os.path.abspath(options.path)
            if options.server:
                chardev.sock = _bind_unix(path)
                info = os.stat(path)
                chardev.unix_path, chardev.unix_inode = path, (info.st_dev, info.st_ino)
                where = f"unix:{options.path},server=on"
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(path)
                except OSError as error:
                    sock.close()
                    raise OptionError(f"Failed to connect to '{options.path}': {error.strerror}") from None
                chardev.connection = sock
                return chardev
        else:
            assert options.host is not None and options.port is not None
            addresses = _resolve(options.host, options.port, options, passive=options.server)
            last_error: OSError | None = None
            for family, kind, proto, _, address in addresses:
                sock = socket.socket(family, kind, proto)
                try:
                    if options.server:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        sock.bind(address)
                        sock.listen(16)
                        chardev.sock = sock
                    else:
                        sock.connect(address)
                        chardev.connection = sock
                    break
                except OSError as error:
                    sock.close()
                    last_error = error
            else:
                verb = "bind" if options.server else "connect"
                reason = last_error.strerror if last_error else "no address"
                raise OptionError(f"Failed to {verb} socket to {options.host}:{options.port}: {reason}")
            if not options.server:
                return chardev
            where = f"tcp:{options.host}:{options.port},server=on"
        if options.wait:
            # server=on,wait=on: like QEMU, wait for the first client before going on.
            warn(f"info: {PROGRAM} waiting for connection on: disconnected:{where}")
            assert chardev.sock is not None
            chardev.connection, _ = chardev.sock.accept()
    except BaseException:
        chardev.close()
        raise
    return chardev


class PidFile:
    """A pidfile written and locked as qemu-storage-daemon does; removed by ``remove()``."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise OptionError(f"cannot create PID file: Could not create '{path}': {error.strerror}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            raise OptionError(f"cannot create PID file: Cannot lock pid file: {error.strerror}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        info = os.fstat(fd)
        self.fd: int | None = fd
        self.inode = (info.st_dev, info.st_ino)

    def remove(self) -> None:
        if self.fd is None:
            return
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self.inode:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


@dataclass(eq=False)
class Daemon:
    """The running daemon's state, so that every exit path can clean up what was made."""

    engine: Any = None
    server: Any = None
    chardevs: dict[str, Chardev] = field(default_factory=dict)
    pidfile: PidFile | None = None
    wake_r: int = -1
    wake_w: int = -1
    terminate_now: bool = True  # while starting, a signal aborts the start-up

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.terminate_now:
            raise Terminated(signum)
        os.write(self.wake_w, b"s")

    def on_quit(self) -> None:
        os.write(self.wake_w, b"q")

    def cleanup(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.engine is not None:
            self.engine.close()
        for chardev in self.chardevs.values():
            chardev.close()
        if self.pidfile is not None:
            self.pidfile.remove()


def _print_object_help(engine: Any, qom_type: str | None) -> bool:
    """Handles ``--object help`` and ``--object TYPE,help`` from our QMP schema. Returns True if
    help was printed, False if ``qom_type`` is unknown."""
    schema = engine.qmp("query-qmp-schema")
    by_name = {entity["name"]: entity for entity in schema}
    command = by_name.get("object-add")
    union = by_name.get(command["arg-type"]) if command else None
    variants = {v["case"]: v["type"] for v in (union or {}).get("variants", [])}
    if qom_type is None:
        print("List of user creatable objects:")
        for name in sorted(variants):
            print(f"  {name}")
        return True
    if qom_type not in variants:
        return False
    print(f"{qom_type} options:")
    for member in sorted(by_name[variants[qom_type]].get("members", []), key=lambda m: m["name"]):
        print(f"  {member['name']}=<{_type_label(by_name, member['type'])}>")
    return True


def _type_label(by_name: dict[str, Any], type_name: str) -> str:
    entity = by_name.get(type_name, {})
    if entity.get("meta-type") == "builtin":
        return str(entity.get("json-type", type_name)).replace("number", "double").replace("boolean", "bool").replace("string", "str")
    if entity.get("meta-type") == "enum":
        return "enum"
    return type_name


def _apply_engine_option(daemon: Daemon, option: Option) -> None:
    from . import _core

    assert option.value is not None
    value = option.value
    if option.name == "object":
        bare = value.split(",")
        if value in ("help", "?"):
            _print_object_help(daemon.engine, None)
            raise SystemExit(0)
        if not value.startswith("{") and ("help" in bare[1:] or "?" in bare[1:]):
            qom_type = bare[0].removeprefix("qom-type=")
            if _print_object_help(daemon.engine, qom_type):
                raise SystemExit(0)
            raise OptionError(f"invalid object type: {qom_type}")
    elif value in ("help", "?"):
        raise OptionError("Help is not available for this option")
    if value.startswith("{"):
        text, keyval = value, False
    else:
        try:
            text = _core.keyval_parse(value, ENGINE_OPTIONS[option.name])
        except ValueError as error:
            raise OptionError(str(error)) from None
        keyval = True
    try:
        daemon.engine.core.cli_option(option.name, text, keyval)
    except _core.Error as error:
        raise OptionError(error.desc) from None


def _apply_options(daemon: Daemon, options: list[Option]) -> None:
    from . import _core
    from .engine import Engine
    from .qmp.server import QMPServer

    daemon.engine = Engine()
    daemon.server = QMPServer(daemon.engine, on_quit=daemon.on_quit)
    for option in options:
        try:
            if option.name in ENGINE_OPTIONS:
                _apply_engine_option(daemon, option)
            elif option.name == "chardev":
                assert option.value is not None
                warnings: list[str] = []
                parsed = parse_chardev(option.value, warnings)
                for warning in warnings:
                    _print_error(option.location, warning)
                if parsed.id in daemon.chardevs:
                    raise OptionError(f"Duplicate ID '{parsed.id}' for chardev")
                daemon.chardevs[parsed.id] = open_chardev(
                    parsed, option.location, lambda text: _print_error(option.location, text)
                )
            elif option.name == "monitor":
                assert option.value is not None
                monitor = parse_monitor(option.value, _core.keyval_parse)
                chardev = daemon.chardevs.get(monitor.chardev)
                if chardev is None:
                    raise OptionError(f'chardev "{monitor.chardev}" not found')
                if chardev.in_use:
                    raise OptionError(f"Device '{monitor.chardev}' is in use")
                _attach_monitor(daemon, chardev, monitor.pretty)
            elif option.name == "trace":
                _print_error(option.location, "warning: blockd has no trace events; option ignored")
        except OptionError as error:
            raise LocatedError(option.location, str(error)) from None


def _attach_monitor(daemon: Daemon, chardev: Chardev, pretty: bool) -> None:
    from .qmp.server import Listener

    chardev.in_use = True
    server = daemon.server
    if chardev.options.backend == "stdio":
        server.add_pipe(sys.stdin.fileno(), sys.stdout.fileno(), pretty)
        return
    if chardev.connection is not None:
        server.add_connection(chardev.connection, pretty)
        chardev.connection = None
    if chardev.sock is not None:
        # The server owns the listening socket from now on and removes its file at stop().
        server.add_listener(Listener(chardev.sock, pretty, chardev.unix_path, chardev.unix_inode))
        chardev.sock = None
        chardev.unix_path = None


class LocatedError(Exception):
    """An option error together with the option it is about."""

    def __init__(self, location: str | None, message: str) -> None:
        super().__init__(message)
        self.location = location
        self.message = message


def _daemonize() -> int:
    """Forks; the parent waits until the child reports it is ready and exits with the child's
    verdict. Returns (in the child) the fd to write the verdict to."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        verdict = b""
        while True:
            chunk = os.read(read_fd, 1)
            if not chunk:
                break
            verdict += chunk
        os._exit(0 if verdict == b"0" else 1)
    os.close(read_fd)
    os.setsid()
    return write_fd


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.chdir("/")


def main(argv: list[str] | None = None) -> int:
    """Runs the daemon with ``argv`` (default: sys.argv[1:]); returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    try:
        options = parse_argv(args)
    except OptionError as error:
        _print_error(None, str(error))
        return 1

    # First pass: -h and -V act at once, in order; --daemonize and --pidfile are noted.
    daemonize = False
    pidfile_path: str | None = None
    for option in options:
        if option.name == "help":
            sys.stdout.write(HELP)
            return 0
        if option.name == "version":
            print(f"{PROGRAM} version {__version__}")
            print("blockd: a block storage engine compatible with qemu-storage-daemon 7.2")
            return 0
        if option.name == "daemonize":
            daemonize = True
        if option.name == "pidfile":
            pidfile_path = option.value
    if daemonize and any(
        option.name == "chardev" and (option.value or "").split(",")[0] in ("stdio", "backend=stdio")
        for option in options
    ):
        _print_error(None, "cannot use stdio with --daemonize")
        return 1

    # Fork before any thread exists: the engine starts threads, and they do not survive fork.
    ready_fd = _daemonize() if daemonize else -1

    daemon = Daemon()
    daemon.wake_r, daemon.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous = {sig: signal.signal(sig, daemon.on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    status = 0
    try:
        try:
            _apply_options(daemon, options)
            if pidfile_path is not None:
                try:
                    daemon.pidfile = PidFile(pidfile_path)
                except OptionError as error:
                    raise LocatedError(None, str(error)) from None
            daemon.server.start()
            daemon.terminate_now = False
        except LocatedError as error:
            _print_error(error.location, error.message)
            status = 1
        except Terminated:
            status = 0
        except SystemExit as exit_request:  # --object help
            status = exit_request.code if isinstance(exit_request.code, int) else 0
        else:
            if ready_fd >= 0:
                os.write(ready_fd, b"0")
                os.close(ready_fd)
                ready_fd = -1
                _detach_stdio()
            _wait(daemon)
    finally:
        daemon.terminate_now = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        daemon.cleanup()
        os.close(daemon.wake_r)
        os.close(daemon.wake_w)
        if ready_fd >= 0:
            os.close(ready_fd)
    return status


def _wait(daemon: Daemon) -> None:
    """Sleeps until a termination signal or a QMP quit."""
    import select

    while True:
        try:
            readable, _, _ = select.select([daemon.wake_r], [], [])
        except InterruptedError:
            continue
        if readable:
            try:
                os.read(daemon.wake_r, 64)
            except BlockingIOError:
                continue
            return


def run() -> NoReturn:
    """Entry point for ``python -m blockd``."""
    raise SystemExit(main())


if __name__ == "__main__":
    run()
