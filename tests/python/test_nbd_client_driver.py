"""The nbd block driver: blockd nodes whose data lives on another NBD server.

Each test opens an nbd node in an in-process engine (the client under test), exports it again with
blockd's own NBD server, and checks the data through that export with independent tools (qemu-img
compare, qemu-img map, libnbd) against the server's backing file. Servers: qemu-nbd, nbdkit (with
filters that change what it negotiates) and a second blockd daemon. Reconnection is tested by
killing and restarting the server during a workload; hostile servers are small Python servers in
this file that answer the handshake and then misbehave.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import blockd
from blockd.testing import create_image, pattern, qemu_img
from blockd.testing.clients import import_libnbd
from blockd.testing.nbd_servers import Server, Workload, compare, connect, nbdkit, qemu_nbd
from blockd.testing.process import QSD, DaemonProcess

nbd = import_libnbd()

needs_libnbd = pytest.mark.skipif(nbd is None, reason="python3-libnbd (module nbd) is not installed")
needs_qemu_nbd = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd missing (qemu-utils)")
needs_nbdkit = pytest.mark.skipif(shutil.which("nbdkit") is None, reason="nbdkit is not installed")
pytestmark = [needs_libnbd, pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")]

MiB = 1 << 20
SIZE = 16 * MiB


# ---- Helpers.


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.kill()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """An in-process engine; client(node_options) adds an nbd node and returns the URI of
    blockd's own writable export of it."""
    engine = blockd.Engine()
    sock = tmp_path / "blockd.sock"
    engine.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    count = [0]

    def add(options: dict[str, Any], writable: bool = True) -> str:
        count[0] += 1
        name = f"n{count[0]}"
        engine.qmp("blockdev-add", {"driver": "nbd", "node-name": name, **options})
        engine.qmp("block-export-add", type="nbd", id=name, node_name=name, name=name, writable=writable)
        return f"nbd+unix:///{name}?socket={sock}"

    add.engine = engine  # type: ignore[attr-defined]
    yield add
    engine.close()


def write_file_pattern(path: Path, offset: int, length: int, seed: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(pattern(offset, length, seed))


def make_image(tmp_path: Path, name: str = "disk.raw") -> Path:
    image = tmp_path / name
    create_image(image, SIZE)
    write_file_pattern(image, 0, 2 * MiB, seed=1)
    write_file_pattern(image, 8 * MiB, 1 * MiB, seed=2)
    return image


def exercise(uri: str) -> None:
    """Writes through `uri` with each command the driver forwards."""
    handle = connect(uri)
    handle.pwrite(pattern(3 * MiB, 3 * MiB, 7), 3 * MiB)  # above the usual maximum payload
    handle.pwrite(pattern(12 * MiB, 4096, 8), 12 * MiB, nbd.CMD_FLAG_FUA)
    if handle.can_zero():
        handle.zero(MiB, 512 * 1024)
    if handle.can_trim():
        handle.trim(MiB, 8 * MiB + 4096)
    handle.flush()
    assert handle.pread(4096, 12 * MiB) == pattern(12 * MiB, 4096, 8)
    handle.shutdown()


# ---- Against real servers.


@needs_qemu_nbd
def test_qemu_nbd_data_and_map(tmp_path: Path, servers: list[Server], client: Callable[..., str]) -> None:
    image = make_image(tmp_path)
    server = qemu_nbd(image, tmp_path / "q.sock").start()
    servers.append(server)
    uri = client({"server": server.address(), "export": "exp"})
    compare(uri, image)
    exercise(uri)
    compare(uri, image)
    # Block status goes through: the map through blockd matches qemu-nbd's own.
    direct = f"nbd+unix:///exp?socket={server.sock}"
    assert json.loads(qemu_img("map", "--output=json", "-f", "raw", uri).stdout) == \
        json.loads(qemu_img("map", "--output=json", "-f", "raw", direct).stdout)


@needs_nbdkit
@pytest.mark.parametrize("variant", [
    pytest.param([], id="structured"),
    pytest.param(["--no-sr"], id="simple-replies"),
    pytest.param(["--filter=blocksize-policy", "blocksize-minimum=512", "blocksize-preferred=4096",
                  "blocksize-maximum=65536", "blocksize-error-policy=error"], id="small-max-block"),
    pytest.param(["--filter=nozero", "--filter=noextents"], id="no-zero-no-extents"),
])
def test_nbdkit(tmp_path: Path, servers: list[Server], client: Callable[..., str], variant: list[str]) -> None:
    image = make_image(tmp_path)
    filters = [arg for arg in variant if arg.startswith("--")]
    params = [arg for arg in variant if not arg.startswith("--")]
    server = nbdkit(tmp_path / "k.sock", *filters, "file", str(image), *params).start()
    servers.append(server)
    uri = client({"server": server.address(), "export": "exp"})
    compare(uri, image)
    exercise(uri)
    compare(uri, image)


def test_blockd_daemon_server(tmp_path: Path, client: Callable[..., str]) -> None:
    image = make_image(tmp_path)
    sock = tmp_path / "d.sock"
    with DaemonProcess(["--blockdev", f"file,node-name=f0,filename={image}",
                        "--nbd-server", f"addr.type=unix,addr.path={sock}",
                        "--export", "nbd,id=e0,node-name=f0,name=exp,writable=on"],
                       directory=tmp_path) as daemon:
        uri = client({"server": {"type": "unix", "path": str(sock)}, "export": "exp"})
        compare(uri, image)
        exercise(uri)
        compare(uri, image)
        assert daemon.proc is not None and daemon.proc.poll() is None


@needs_qemu_nbd
def test_export_in_an_iothread(tmp_path: Path, servers: list[Server]) -> None:
    """The connection stays on the loop that opened it; requests from an iothread hop to it."""
    image = make_image(tmp_path)
    server = qemu_nbd(image, tmp_path / "q.sock").start()
    servers.append(server)
    sock = tmp_path / "io.sock"
    with blockd.Engine() as engine:
        engine.qmp("object-add", qom_type="iothread", id="io0")
        engine.qmp("blockdev-add", driver="nbd", node_name="n", server=server.address(), export="exp")
        engine.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        engine.qmp("block-export-add", type="nbd", id="n", node_name="n", writable=True, iothread="io0")
        uri = f"nbd+unix:///n?socket={sock}"
        compare(uri, image)
        exercise(uri)
        compare(uri, image)


@needs_qemu_nbd
def test_read_only_server(tmp_path: Path, servers: list[Server], client: Callable[..., str]) -> None:
    image = make_image(tmp_path)
    server = qemu_nbd(image, tmp_path / "r.sock", "-r").start()
    servers.append(server)
    engine = client.engine  # type: ignore[attr-defined]
    with pytest.raises(blockd.ExecuteError) as error:
        engine.qmp("blockdev-add", driver="nbd", node_name="rw", server=server.address(), export="exp")
    assert error.value.desc == "Could not open image: Permission denied"
    uri = client({"server": server.address(), "export": "exp", "read-only": True}, writable=False)
    compare(uri, image)
    # auto-read-only falls back to read-only, as in QEMU.
    engine.qmp("blockdev-add", driver="nbd", node_name="auto", server=server.address(), export="exp",
               auto_read_only=True)
    nodes = {node["node-name"]: node for node in engine.qmp("query-named-block-nodes")}
    assert nodes["auto"]["ro"] is True
    assert nodes["auto"]["file"] == f"nbd+unix:///exp?socket={server.sock}"


# ---- Errors, compared with qemu-storage-daemon 7.2.


def qsd_blockdev_error(qsd: DaemonProcess, options: dict[str, Any]) -> str:
    assert qsd.qmp is not None
    reply = qsd.qmp.cmd("blockdev-add", options)
    return reply["error"]["desc"]


@needs_qemu_nbd
@pytest.mark.skipif(not os.access(QSD, os.X_OK), reason=f"{QSD} is not installed")
def test_open_errors_match_qsd(tmp_path: Path, servers: list[Server], client: Callable[..., str]) -> None:
    image = make_image(tmp_path)
    server = qemu_nbd(image, tmp_path / "q.sock").start()
    servers.append(server)
    with socket.socket() as unused:  # a TCP port nobody listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    cases = [
        {"server": {"type": "unix", "path": str(tmp_path / "missing.sock")}},
        {"server": {"type": "inet", "host": "127.0.0.1", "port": str(port)}, "export": "x"},
        {"server": server.address(), "export": "wrong"},
        {"server": server.address()},
        {"server": server.address(), "export": "exp", "tls-creds": "tls0"},
        {"server": {"type": "fd", "str": "3"}},
        {"server": {"type": "inet", "host": "nosuchhost.invalid", "port": "10809"}},
    ]
    engine = client.engine  # type: ignore[attr-defined]
    qsd = DaemonProcess([], command=[QSD], directory=tmp_path).start()
    try:
        for index, case in enumerate(cases):
            options = {"driver": "nbd", "node-name": f"bad{index}", **case}
            with pytest.raises(blockd.ExecuteError) as error:
                engine.qmp("blockdev-add", options)
            assert error.value.error_class == "GenericError"
            actual, expected = error.value.desc, qsd_blockdev_error(qsd, options)
            if case["server"].get("host") == "nosuchhost.invalid":
                # The resolver's own words may differ from one lookup to the next (a timeout under
                # load says "Temporary failure in name resolution"); the part blockd words must match.
                actual, expected = actual.rsplit(": ", 1)[0], expected.rsplit(": ", 1)[0]
            assert actual == expected, case
    finally:
        qsd.close()
    for option, value in (("x-dirty-bitmap", "qemu:dirty-bitmap:b"),):
        with pytest.raises(blockd.ExecuteError) as error:
            engine.qmp("blockdev-add", {"driver": "nbd", "node-name": "x", "server": server.address(),
                                        "export": "exp", option: value})
        assert option in error.value.desc and "not supported by blockd" in error.value.desc


@needs_qemu_nbd
def test_open_timeout_waits_for_the_server(tmp_path: Path, servers: list[Server], client: Callable[..., str]) -> None:
    image = make_image(tmp_path)
    server = qemu_nbd(image, tmp_path / "late.sock")
    servers.append(server)
    starter = threading.Timer(0.3, server.start)
    starter.start()
    uri = client({"server": server.address(), "export": "exp", "open-timeout": 10})
    starter.join()
    compare(uri, image)
    # Without open-timeout a missing server fails at once.
    engine = client.engine  # type: ignore[attr-defined]
    started = time.monotonic()
    with pytest.raises(blockd.ExecuteError, match="Failed to connect to"):
        engine.qmp("blockdev-add", driver="nbd", node_name="gone",
                   server={"type": "unix", "path": str(tmp_path / "never.sock")}, open_timeout=1)
    assert 0.5 < time.monotonic() - started < 5


# ---- Reconnection.


@needs_qemu_nbd
def test_server_restart_within_reconnect_delay(tmp_path: Path, servers: list[Server],
                                               client: Callable[..., str]) -> None:
    image = make_image(tmp_path)
    server = qemu_nbd(image, tmp_path / "q.sock").start()
    servers.append(server)
    uri = client({"server": server.address(), "export": "exp", "reconnect-delay": 10})
    workload = Workload(uri, 4 * MiB)
    workload.start()
    try:
        for _ in range(2):
            workload.rounds_after(5)
            server.kill()
            time.sleep(0.2)  # requests now wait for the server
            server.start()
            workload.rounds_after(5)
    finally:
        workload.stop_event.set()
        workload.join(30)
    assert workload.errors == []
    compare(uri, image)


@needs_qemu_nbd
def test_requests_fail_cleanly_after_reconnect_delay(tmp_path: Path, servers: list[Server],
                                                     client: Callable[..., str]) -> None:
    image = make_image(tmp_path)
    server = qemu_nbd(image, tmp_path / "q.sock").start()
    servers.append(server)
    uri = client({"server": server.address(), "export": "exp", "reconnect-delay": 1})
    handle = connect(uri)
    assert handle.pread(4096, 0) == pattern(0, 4096, 1)
    server.kill()
    started = time.monotonic()
    with pytest.raises(nbd.Error) as error:
        handle.pread(4096, 0)
    waited = time.monotonic() - started
    assert error.value.errno == "EIO" or "Input/output error" in str(error.value)
    assert 0.7 < waited < 8, waited
    # Still failing at once while the server is away; working again once it is back.
    with pytest.raises(nbd.Error):
        handle.pwrite(b"x" * 4096, 0)
    server.start()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert handle.pread(4096, 8 * MiB) == pattern(8 * MiB, 4096, 2)
            break
        except nbd.Error:
            assert time.monotonic() < deadline, "no reconnection after the server came back"
            time.sleep(0.05)
    handle.shutdown()


# ---- Hostile and odd servers.


class FakeServer(threading.Thread):
    """A minimal NBD server that negotiates correctly, then answers requests as `mode` says."""

    SIZE = 1 * MiB

    def __init__(self, sock: Path, mode: str) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.mode = mode
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(sock))
        self.listener.listen(4)
        self.connections = 0

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            try:
                self.serve(conn)
            except (OSError, struct.error):
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self.listener.close()

    @staticmethod
    def recv(conn: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise OSError("client went away")
            data += chunk
        return data

    def reply_option(self, conn: socket.socket, option: int, kind: int, payload: bytes = b"") -> None:
        conn.sendall(struct.pack(">QIII", 0x3E889045565A9, option, kind, len(payload)) + payload)

    def serve(self, conn: socket.socket) -> None:
        if self.mode == "bad-greeting":
            conn.sendall(b"HELLO THERE, CLIENT\n" * 4)
            self.recv(conn, 1)
            return
        conn.sendall(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
        self.recv(conn, 4)
        structured = False
        while True:
            _, option, length = struct.unpack(">QII", self.recv(conn, 16))
            self.recv(conn, length)
            if option == 8:  # STRUCTURED_REPLY
                if self.mode.startswith("simple"):
                    self.reply_option(conn, option, (1 << 31) + 1)
                else:
                    structured = True
                    self.reply_option(conn, option, 1)
            elif option == 7:  # GO
                self.reply_option(conn, option, 3, struct.pack(">HQH", 0, self.SIZE, 1 | 4 | 8))
                self.reply_option(conn, option, 1)
                break
            else:
                self.reply_option(conn, option, (1 << 31) + 1)
        while True:
            _, flags, kind, cookie, offset, length = struct.unpack(">IHHQQI", self.recv(conn, 28))
            if kind == 2:
                return
            if kind == 1:
                self.recv(conn, length)
            if kind != 0:
                conn.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie))
                continue
            self.answer_read(conn, structured, cookie, offset, length)

    def answer_read(self, conn: socket.socket, structured: bool, cookie: int, offset: int, length: int) -> None:
        data = bytes(length)
        mode = self.mode
        if mode == "garbage-reply":
            conn.sendall(os.urandom(64))
            time.sleep(0.2)
        elif mode == "close-mid-reply":
            conn.sendall(struct.pack(">IHHQI", 0x668E33EF, 1, 1, cookie, 8 + length)
                         + struct.pack(">Q", offset) + data[: length // 2])
        elif mode == "wrong-cookie":
            conn.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie ^ 0x5A5A))
        elif mode == "out-of-bounds-data":
            conn.sendall(struct.pack(">IHHQI", 0x668E33EF, 1, 1, cookie, 8 + length)
                         + struct.pack(">Q", offset + 4096) + data)
        elif mode == "short-read":  # DONE without covering the request
            conn.sendall(struct.pack(">IHHQI", 0x668E33EF, 1, 1, cookie, 8 + length // 2)
                         + struct.pack(">Q", offset) + data[: length // 2])
        elif mode == "error-chunk":
            message = b"the disk is on fire"
            conn.sendall(struct.pack(">IHHQI", 0x668E33EF, 1, (1 << 15) + 1, cookie, 6 + len(message))
                         + struct.pack(">IH", 28, len(message)) + message)
            return
        elif mode == "simple-ok":
            conn.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie) + data)
            return
        else:
            raise AssertionError(mode)
        raise OSError("misbehaved; hang up")


@pytest.mark.parametrize("mode,errno_name", [
    ("garbage-reply", "EIO"),
    ("close-mid-reply", "EIO"),
    ("wrong-cookie", "EIO"),
    ("out-of-bounds-data", "EIO"),
    ("short-read", "EIO"),
    ("error-chunk", "ENOSPC"),
])
def test_hostile_server(tmp_path: Path, client: Callable[..., str], mode: str, errno_name: str) -> None:
    fake = FakeServer(tmp_path / "fake.sock", mode)
    fake.start()
    try:
        uri = client({"server": {"type": "unix", "path": str(fake.sock)}})
        handle = connect(uri)
        with pytest.raises(nbd.Error) as error:
            handle.pread(4096, 0)
        assert error.value.errno == errno_name, error.value
        handle.shutdown()
        # The engine carries on: its other nodes and its QMP monitor still work.
        engine = client.engine  # type: ignore[attr-defined]
        engine.qmp("blockdev-add", driver="null-co", node_name="still-alive", size=MiB)
        assert any(node["node-name"] == "still-alive" for node in engine.qmp("query-named-block-nodes"))
    finally:
        fake.close()


def test_bad_greeting_and_simple_replies(tmp_path: Path, client: Callable[..., str]) -> None:
    bad = FakeServer(tmp_path / "bad.sock", "bad-greeting")
    bad.start()
    engine = client.engine  # type: ignore[attr-defined]
    try:
        with pytest.raises(blockd.ExecuteError) as error:
            engine.qmp("blockdev-add", driver="nbd", node_name="bad",
                       server={"type": "unix", "path": str(bad.sock)})
        assert error.value.desc == "NBD server broke the handshake protocol: the server's greeting has a bad magic"
    finally:
        bad.close()
    simple = FakeServer(tmp_path / "simple.sock", "simple-ok")
    simple.start()
    try:
        handle = connect(client({"server": {"type": "unix", "path": str(simple.sock)}}))
        assert handle.pread(8192, 4096) == bytes(8192)
        handle.shutdown()
    finally:
        simple.close()
