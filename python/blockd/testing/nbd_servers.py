"""NBD servers and client workloads for tests of blockd's nbd driver and of what stacks on it.

``Server`` runs an NBD server process (qemu-nbd, nbdkit, ...) on a unix socket or a TCP address,
optionally inside a network namespace, and can kill and restart it; ``Workload`` writes and reads
back patterned blocks through an NBD URI in a thread and records every error it sees;
``compare`` checks two images with ``qemu-img compare``.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from .clients import import_libnbd
from .images import pattern
from .process import tool_env

__all__ = ["Server", "Workload", "compare", "connect", "nbdkit", "qemu_nbd", "wait_for_socket"]

nbd = import_libnbd()


def wait_for_socket(endpoint: Path | tuple[str, int], proc: subprocess.Popen[bytes] | None = None,
                    timeout: float = 10.0) -> None:
    """Waits until `endpoint` accepts connections (the server is ready), or fails if `proc` exits."""
    deadline = time.monotonic() + timeout
    while True:
        family = socket.AF_INET if isinstance(endpoint, tuple) else socket.AF_UNIX
        try:
            with socket.socket(family) as probe:
                probe.settimeout(1.0)
                probe.connect(endpoint if isinstance(endpoint, tuple) else str(endpoint))
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{endpoint} did not come up")
            time.sleep(0.01)


class Server:
    """An NBD server process that can be killed and started again.

    It listens on `endpoint`: a unix socket path, or a TCP (host, port) which, with `netns`, exists
    only inside that network namespace (the process runs under ``ip netns exec``).
    """

    def __init__(self, argv: list[str], endpoint: Path | tuple[str, int], netns: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.endpoint = endpoint
        self.netns = netns
        self.env = env if env is not None else tool_env()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def sock(self) -> Path:
        assert isinstance(self.endpoint, Path), "a TCP server has no socket path"
        return self.endpoint

    def start(self) -> "Server":
        if isinstance(self.endpoint, Path) and self.endpoint.exists():
            self.endpoint.unlink()
        argv = ["ip", "netns", "exec", self.netns, *self.argv] if self.netns else self.argv
        self.proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_socket(self.endpoint, self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def address(self) -> dict[str, str]:
        """The server's address as a QMP SocketAddress."""
        if isinstance(self.endpoint, tuple):
            return {"type": "inet", "host": self.endpoint[0], "port": str(self.endpoint[1])}
        return {"type": "unix", "path": str(self.endpoint)}


def qemu_nbd(image: Path, endpoint: Path | tuple[str, int], *extra: str, netns: str | None = None) -> Server:
    """qemu-nbd serving the raw `image` as export "exp"."""
    where = ["-b", endpoint[0], "-p", str(endpoint[1])] if isinstance(endpoint, tuple) else ["-k", str(endpoint)]
    return Server(["qemu-nbd", "-t", "-e", "16", *where, "-f", "raw", "-x", "exp", "--cache=none",
                   "--aio=threads", *extra, str(image)], endpoint, netns)


def nbdkit(sock: Path, *args: str) -> Server:
    """nbdkit on a unix socket with export name "exp"; `args` are its plugin, filters and parameters."""
    # -f: stay in the foreground so that kill() stops the server itself.
    return Server(["nbdkit", "-f", "-U", str(sock), "-e", "exp", *args], sock)


def connect(uri: str) -> Any:
    handle = nbd.NBD()
    handle.connect_uri(uri)
    return handle


def compare(a: str | Path, b: str | Path) -> None:
    """qemu-img compare of two images (paths are raw files, strings with :// are NBD URIs)."""
    result = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                            capture_output=True, text=True, env=tool_env())
    assert result.returncode == 0, result.stdout + result.stderr


class Workload(threading.Thread):
    """Writes then reads back patterned blocks through an NBD URI until stopped; records errors."""

    def __init__(self, uri: str, region: int) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.region = region
        self.stop_event = threading.Event()
        self.errors: list[str] = []
        self.rounds = 0
        self.progress = threading.Event()

    def run(self) -> None:
        handle = connect(self.uri)
        try:
            while not self.stop_event.is_set():
                offset = self.region + (self.rounds % 64) * 65536
                data = pattern(offset, 65536, self.rounds)
                try:
                    handle.pwrite(data, offset)
                    if handle.pread(65536, offset) != data:
                        self.errors.append(f"round {self.rounds}: data mismatch at {offset}")
                except nbd.Error as error:
                    self.errors.append(f"round {self.rounds}: {error}")
                    return
                self.rounds += 1
                self.progress.set()
        finally:
            handle.shutdown()

    def rounds_after(self, count: int, timeout: float = 20.0) -> None:
        target = self.rounds + count
        deadline = time.monotonic() + timeout
        while self.rounds < target and not self.errors:
            assert time.monotonic() < deadline, "the workload made no progress"
            time.sleep(0.01)
