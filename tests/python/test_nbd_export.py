"""The NBD export against real clients: an in-process engine (blockd._core) serves nodes over NBD,
and python3-libnbd, qemu-img, qemu-io and nbdinfo check what they see.

Each test reads like a session: add nodes, start the server, add exports over QMP, then check the
data and the protocol features with an independent client.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from blockd.testing.clients import import_core, import_libnbd

core = import_core()
nbd = import_libnbd()

needs_libnbd = pytest.mark.skipif(nbd is None, reason="python3-libnbd (module nbd) is not installed")
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing (qemu-utils)")
needs_qemu_io = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io missing (qemu-utils)")
needs_nbdinfo = pytest.mark.skipif(shutil.which("nbdinfo") is None, reason="nbdinfo missing (libnbd-bin)")


class QMPFailed(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error['class']}: {error['desc']}")
        self.error_class = error["class"]
        self.desc = error["desc"]


class Session:
    """An engine plus helpers to run QMP commands and collect events."""

    def __init__(self) -> None:
        self.engine = core.Engine()

    def qmp(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = {key.replace("_", "-"): value for key, value in arguments.items()}
        reply = json.loads(self.engine.execute(json.dumps(request)))
        if "error" in reply:
            raise QMPFailed(reply["error"])
        return reply["return"]

    def error(self, command: str, **arguments: Any) -> tuple[str, str]:
        with pytest.raises(QMPFailed) as info:
            self.qmp(command, **arguments)
        return info.value.error_class, info.value.desc

    def events(self, name: str, timeout: float = 0.2) -> list[dict[str, Any]]:
        found = []
        while True:
            line = self.engine.next_event(timeout)
            if line is None:
                return found
            event = json.loads(line)
            if event["event"] == name:
                found.append(event.get("data", {}))

    def close(self) -> None:
        self.engine.shutdown()


@pytest.fixture
def session() -> Iterator[Session]:
    s = Session()
    yield s
    s.close()


@pytest.fixture
def sock(tmp_path: Path) -> str:
    return str(tmp_path / "nbd.sock")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unix_addr(path: str) -> dict[str, Any]:
    return {"type": "unix", "data": {"path": path}}


def make_image(path: Path, size: int, pattern: bytes | None = None) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        if pattern:
            f.seek(0)
            f.write(pattern)


def export_file(session: Session, path: Path, sock: str, name: str = "disk", writable: bool = True,
                **extra: Any) -> None:
    session.qmp("blockdev-add", driver="file", node_name="file0", filename=str(path))
    session.qmp("nbd-server-start", addr=unix_addr(sock))
    session.qmp("block-export-add", type="nbd", id="exp0", node_name="file0", name=name,
                writable=writable, **extra)


def connect(sock: str, name: str = "disk", structured: bool = True, meta: bool = True) -> Any:
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_export_name(name)
    h.connect_unix(sock)
    return h


# ---- QMP behaviour (errors as qemu-storage-daemon 7.2 gives them).

def test_qmp_errors_match_qsd(session: Session, sock: str) -> None:
    session.qmp("blockdev-add", driver="null-co", node_name="n0", size=1 << 20)
    session.qmp("blockdev-add", driver="null-co", node_name="ro", size=1 << 20, read_only=True)
    assert session.error("block-export-add", type="nbd", id="e0", node_name="n0") == \
        ("GenericError", "NBD server not running")
    assert session.error("nbd-server-stop") == ("GenericError", "NBD server not running")
    assert session.error("nbd-server-add", device="n0") == ("GenericError", "NBD server not running")
    assert session.error("nbd-server-remove", name="n0") == ("GenericError", "Export 'n0' is not found")
    session.qmp("nbd-server-start", addr=unix_addr(sock))
    assert session.error("nbd-server-start", addr=unix_addr(sock + "2")) == \
        ("GenericError", "NBD server already running")
    assert session.error("block-export-add", type="nbd", id="", node_name="n0") == \
        ("GenericError", "Invalid block export id")
    assert session.error("block-export-add", type="nbd", id="e0", node_name="nope") == \
        ("GenericError", "Cannot find device='' nor node-name='nope'")
    session.qmp("block-export-add", type="nbd", id="e0", node_name="n0")
    assert session.error("block-export-add", type="nbd", id="e0", node_name="n0") == \
        ("GenericError", "Block export id 'e0' is already in use")
    assert session.error("block-export-add", type="nbd", id="e1", node_name="n0") == \
        ("GenericError", "NBD server already has export named 'n0'")
    assert session.error("block-export-add", type="nbd", id="e1", node_name="n0", name="x" * 4097) == \
        ("GenericError", "export name '" + "x" * 4097 + "' too long")
    assert session.error("block-export-add", type="nbd", id="e1", node_name="n0", name="y",
                         description="d" * 4097) == \
        ("GenericError", "description '" + "d" * 4097 + "' too long")
    assert session.error("block-export-add", type="nbd", id="e1", node_name="ro", writable=True) == \
        ("GenericError", "Cannot export read-only node as writable")
    assert session.error("block-export-add", type="nbd", id="e1", node_name="n0", name="z",
                         iothread="nope") == ("GenericError", 'iothread "nope" not found')
    assert session.error("block-export-add", type="nbd", id="e1", node_name="n0", name="z",
                         allocation_depth=True) == \
        ("GenericError", "allocation-depth is not supported by blockd yet")  # qsd: accepted
    assert session.error("block-export-add", type="nbd", id="e1", node_name="n0", name="z",
                         bitmaps=["b"]) == ("GenericError", "Bitmap 'b' is not found")
    assert session.error("nbd-server-add", device="nope") == \
        ("GenericError", "Cannot find device='nope' nor node-name='nope'")
    session.qmp("nbd-server-add", device="ro", name="legacy")
    assert session.error("nbd-server-add", device="n0", name="legacy") == \
        ("GenericError", "Block export id 'legacy' is already in use")
    assert session.qmp("query-block-exports") == [
        {"id": "legacy", "type": "nbd", "node-name": "ro", "shutting-down": False},
        {"id": "e0", "type": "nbd", "node-name": "n0", "shutting-down": False},
    ]
    assert session.error("block-export-del", id="nope") == ("GenericError", "Export 'nope' is not found")
    session.qmp("nbd-server-remove", name="legacy")
    assert session.events("BLOCK_EXPORT_DELETED") == [{"id": "legacy"}]
    session.qmp("block-export-del", id="e0")
    assert session.events("BLOCK_EXPORT_DELETED") == [{"id": "e0"}]
    assert session.qmp("query-block-exports") == []
    # The id is reusable once the export is gone.
    session.qmp("block-export-add", type="nbd", id="e0", node_name="n0")
    session.qmp("nbd-server-stop")
    assert session.events("BLOCK_EXPORT_DELETED") == [{"id": "e0"}]
    assert not os.path.exists(sock)


def test_bad_listen_addresses(session: Session, tmp_path: Path) -> None:
    assert session.error("nbd-server-start", addr=unix_addr("/nonexistent/x.sock")) == \
        ("GenericError", "Failed to bind socket to /nonexistent/x.sock: No such file or directory")
    long_path = str(tmp_path / ("x" * 120))
    assert session.error("nbd-server-start", addr=unix_addr(long_path)) == \
        ("GenericError", f"UNIX socket path '{long_path}' is too long")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert session.error("nbd-server-start",
                             addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}) == \
            ("GenericError", "Failed to find an available port: Address already in use")
    assert session.error("nbd-server-start", addr={"type": "fd", "data": {"str": "x"}}) == \
        ("GenericError", "only QEMU supports file descriptor passing")
    assert session.error("nbd-server-start", addr=unix_addr(str(tmp_path / "s")), tls_creds="t") == \
        ("GenericError", "No TLS credentials with id 't'")


# ---- libnbd.

@needs_libnbd
@pytest.mark.parametrize("structured", [True, False])
def test_libnbd_read_write(session: Session, sock: str, tmp_path: Path, structured: bool) -> None:
    image = tmp_path / "disk.raw"
    make_image(image, 4 << 20, b"hello")
    export_file(session, image, sock, description="the demo disk")
    h = connect(sock, structured=structured, meta=structured)
    assert h.get_size() == 4 << 20
    assert h.get_structured_replies_negotiated() == structured
    assert h.pread(5, 0) == b"hello"
    assert not h.is_read_only()
    assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_cache()
    assert h.can_fast_zero()
    assert h.can_multi_conn()
    assert h.can_df() == structured
    h.pwrite(b"x" * 65536, 1 << 20, nbd.CMD_FLAG_FUA)
    h.zero(8192, 2 << 20, nbd.CMD_FLAG_NO_HOLE)
    h.trim(4096, 3 << 20)
    h.flush()
    h.cache(4096, 0)
    assert h.pread(65536, 1 << 20) == b"x" * 65536
    big = h.pread(3 << 20, 0)  # large reads come back in data and hole chunks
    assert big[:5] == b"hello" and big[1 << 20:(1 << 20) + 65536] == b"x" * 65536
    with pytest.raises(nbd.Error) as info:
        h.pread(512, 4 << 20)
    assert info.value.errno == "EINVAL"
    h.shutdown()
    with open(image, "rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == b"x" * 65536


@needs_libnbd
def test_libnbd_block_status(session: Session, sock: str, tmp_path: Path) -> None:
    image = tmp_path / "sparse.raw"
    make_image(image, 4 << 20)
    with open(image, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"d" * (1 << 20))
    export_file(session, image, sock)
    h = connect(sock)
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    extents: list[tuple[int, int]] = []

    def callback(metacontext: str, offset: int, entries: list[int], err: Any) -> int:
        assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
        extents.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(4 << 20, 0, callback)
    assert sum(length for length, _ in extents) == 4 << 20
    assert extents[0] == (1 << 20, nbd.STATE_HOLE | nbd.STATE_ZERO)
    assert extents[1] == (1 << 20, 0)
    extents.clear()
    h.block_status(4 << 20, 0, callback, nbd.CMD_FLAG_REQ_ONE)
    assert extents == [(1 << 20, nbd.STATE_HOLE | nbd.STATE_ZERO)]
    h.shutdown()


@needs_libnbd
def test_libnbd_list_and_descriptions(session: Session, sock: str) -> None:
    session.qmp("blockdev-add", driver="null-co", node_name="n0", size=1 << 20)
    session.qmp("blockdev-add", driver="null-co", node_name="n1", size=2 << 20)
    session.qmp("nbd-server-start", addr=unix_addr(sock))
    session.qmp("block-export-add", type="nbd", id="a", node_name="n0", description="first export")
    session.qmp("block-export-add", type="nbd", id="b", node_name="n1", name="second")
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_unix(sock)
    listed: dict[str, str] = {}
    h.opt_list(lambda name, description: listed.__setitem__(name, description) or 0)
    assert listed == {"n0": "first export", "second": ""}
    h.set_export_name("n0")
    h.opt_info()
    assert h.get_size() == 1 << 20
    assert h.get_export_description() == "first export"
    assert h.get_canonical_export_name() == "n0"
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
    h.set_export_name("nope")
    with pytest.raises(nbd.Error):
        h.opt_info()
    contexts: list[str] = []
    h.set_export_name("second")
    h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
    assert contexts == [nbd.CONTEXT_BASE_ALLOCATION]
    h.opt_go()
    assert h.get_size() == 2 << 20
    assert h.is_read_only()
    h.shutdown()


@needs_libnbd
def test_libnbd_read_only_refusals(session: Session, sock: str) -> None:
    session.qmp("blockdev-add", driver="null-co", node_name="n0", size=1 << 20)
    session.qmp("nbd-server-start", addr=unix_addr(sock))
    session.qmp("block-export-add", type="nbd", id="e", node_name="n0")
    h = nbd.NBD()
    h.set_export_name("n0")
    h.set_strict_mode(0)  # let the requests reach the server
    h.connect_unix(sock)
    assert h.is_read_only()
    assert not h.can_trim() and not h.can_zero()
    for call in (lambda: h.pwrite(b"x", 0), lambda: h.zero(512, 0), lambda: h.trim(512, 0)):
        with pytest.raises(nbd.Error) as info:
            call()
        assert info.value.errno == "EPERM"
    assert h.pread(512, 0) == bytes(512)
    h.shutdown()


@needs_libnbd
def test_multi_conn_and_max_connections(session: Session, sock: str, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    make_image(image, 1 << 20)
    export_file(session, image, sock)
    handles = [connect(sock) for _ in range(4)]
    assert all(h.can_multi_conn() for h in handles)
    handles[0].pwrite(b"abc", 0)
    handles[0].flush()
    assert all(h.pread(3, 0) == b"abc" for h in handles)
    for h in handles:
        h.shutdown()
    session.qmp("block-export-del", id="exp0")
    session.qmp("nbd-server-stop")
    session.qmp("nbd-server-start", addr=unix_addr(sock), max_connections=1)
    session.qmp("block-export-add", type="nbd", id="exp1", node_name="file0", name="disk")
    h = connect(sock)
    assert not h.can_multi_conn()
    h.shutdown()


@needs_libnbd
def test_export_del_safe_and_hard(session: Session, sock: str) -> None:
    session.qmp("blockdev-add", driver="null-co", node_name="n0", size=1 << 20)
    session.qmp("nbd-server-start", addr=unix_addr(sock))
    session.qmp("block-export-add", type="nbd", id="e", node_name="n0", writable=True)
    h = connect(sock, name="n0")
    assert session.error("block-export-del", id="e") == ("GenericError", "export 'e' still in use")
    assert session.error("block-export-del", id="e", mode="safe") == ("GenericError", "export 'e' still in use")
    assert session.error("blockdev-del", node_name="n0")[0] == "GenericError"
    session.qmp("block-export-del", id="e", mode="hard")
    assert session.events("BLOCK_EXPORT_DELETED") == [{"id": "e"}]
    assert session.qmp("query-block-exports") == []
    with pytest.raises(nbd.Error):
        h.pread(512, 0)
    session.qmp("blockdev-del", node_name="n0")


# ---- qemu-img, qemu-io, nbdinfo.

@needs_qemu_img
def test_qemu_img_convert_compare_map(session: Session, sock: str, tmp_path: Path) -> None:
    source = tmp_path / "source.raw"
    make_image(source, 8 << 20)
    with open(source, "r+b") as f:
        f.seek(3 << 20)
        f.write(os.urandom(1 << 20))
    target = tmp_path / "target.raw"
    make_image(target, 8 << 20)
    session.qmp("blockdev-add", driver="file", node_name="target", filename=str(target))
    session.qmp("nbd-server-start", addr=unix_addr(sock))
    session.qmp("block-export-add", type="nbd", id="t", node_name="target", writable=True)
    uri = f"nbd+unix:///target?socket={sock}"
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), uri], check=True)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), uri], check=True)
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", uri], check=True,
                         capture_output=True, text=True).stdout
    data = [e for e in json.loads(out) if e["data"]]
    assert any(e["start"] <= 3 << 20 < e["start"] + e["length"] for e in data)


@needs_qemu_img
@needs_qemu_io
def test_qemu_io_over_tcp(session: Session, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    make_image(image, 4 << 20)
    port = free_port()
    session.qmp("blockdev-add", driver="file", node_name="file0", filename=str(image))
    session.qmp("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}})
    session.qmp("block-export-add", type="nbd", id="e", node_name="file0", writable=True)
    uri = f"nbd://127.0.0.1:{port}/file0"
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 64k 128k", "-c", "flush", uri],
                   check=True, capture_output=True)
    out = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 64k 128k", "-c", "read -P 0 0 64k", uri],
                         check=True, capture_output=True, text=True).stdout
    assert "Pattern verification failed" not in out
    assert subprocess.run(["qemu-img", "info", "--output=json", uri], check=True,
                          capture_output=True, text=True).stdout.count(str(4 << 20)) >= 1


@needs_nbdinfo
def test_nbdinfo(session: Session, sock: str) -> None:
    session.qmp("blockdev-add", driver="null-co", node_name="n0", size=1 << 20, read_zeroes=True)
    session.qmp("nbd-server-start", addr=unix_addr(sock))
    session.qmp("block-export-add", type="nbd", id="e", node_name="n0", description="null disk")
    out = subprocess.run(["nbdinfo", "--json", f"nbd+unix:///n0?socket={sock}"], check=True,
                         capture_output=True, text=True).stdout
    info = json.loads(out)
    assert info["protocol"] == "newstyle-fixed"
    export = info["exports"][0]
    assert export["export-name"] == "n0"
    assert export["description"] == "null disk"
    assert export["export-size"] == 1 << 20
    assert export["is_read_only"] is True
    assert "base:allocation" in export["contexts"]
    out = subprocess.run(["nbdinfo", "--list", "--json", f"nbd+unix://?socket={sock}"], check=True,
                         capture_output=True, text=True).stdout
    assert [e["export-name"] for e in json.loads(out)["exports"]] == ["n0"]


def test_cli_nbd_server_option(sock: str) -> None:
    engine = core.Engine()
    try:
        engine.cli_option("nbd-server", json.dumps({"addr": {"type": "unix", "path": sock}}), True)
        assert os.path.exists(sock)
        with pytest.raises(core.Error):
            engine.cli_option("nbd-server", json.dumps({"addr": {"type": "unix", "path": sock}}), True)
    finally:
        engine.shutdown()
    assert not os.path.exists(sock)


def test_cli_export_option_keyval(sock: str) -> None:
    engine = core.Engine()
    try:
        engine.cli_option("blockdev", json.dumps({"driver": "null-co", "node-name": "n0", "size": "1048576"}), True)
        engine.cli_option("nbd-server", json.dumps({"addr": {"type": "unix", "path": sock}, "max-connections": "2"}), True)
        engine.cli_option("export", json.dumps({"type": "nbd", "id": "e", "node-name": "n0", "writable": "on",
                                                "description": "from the command line"}), True)
        reply = json.loads(engine.execute(json.dumps({"execute": "query-block-exports"})))
        assert reply["return"] == [{"id": "e", "type": "nbd", "node-name": "n0", "shutting-down": False}]
        if nbd is not None:
            h = connect(sock, name="n0")
            assert not h.is_read_only()
            assert h.get_size() == 1 << 20
            h.shutdown()
    finally:
        engine.shutdown()


@needs_libnbd
def test_max_connections_queues_extra_clients(session: Session, sock: str) -> None:
    session.qmp("blockdev-add", driver="null-co", node_name="n0", size=1 << 20)
    session.qmp("nbd-server-start", addr=unix_addr(sock), max_connections=1)
    session.qmp("block-export-add", type="nbd", id="e", node_name="n0")
    first = connect(sock, name="n0")
    second = nbd.NBD()
    second.set_export_name("n0")
    second.aio_connect_unix(sock)  # accepted by the kernel backlog; the server does not answer yet
    for _ in range(20):
        second.poll(50)  # wait up to 50 ms per round for handshake traffic
    assert second.aio_is_connecting()
    first.shutdown()
    while second.aio_is_connecting():
        second.poll(1000)
    assert second.aio_is_ready()
    assert second.pread(512, 0) == bytes(512)
    second.shutdown()


@pytest.mark.skipif(shutil.which("nbdcopy") is None, reason="nbdcopy missing (libnbd-bin)")
def test_nbdcopy_round_trip(session: Session, sock: str, tmp_path: Path) -> None:
    source = tmp_path / "source.raw"
    with open(source, "wb") as f:
        f.write(os.urandom(3 << 20))
        f.truncate(8 << 20)
    target = tmp_path / "target.raw"
    make_image(target, 8 << 20)
    export_file(session, target, sock)
    uri = f"nbd+unix:///disk?socket={sock}"
    subprocess.run(["nbdcopy", str(source), uri], check=True)
    back = tmp_path / "back.raw"
    subprocess.run(["nbdcopy", uri, str(back)], check=True)
    assert back.read_bytes() == source.read_bytes()


@needs_libnbd
def test_engine_shutdown_with_clients_connected(tmp_path: Path, sock: str) -> None:
    image = tmp_path / "disk.raw"
    make_image(image, 1 << 20)
    s = Session()
    export_file(s, image, sock)
    h = connect(sock)
    h.pwrite(b"persist", 0)  # answered: it must survive the shutdown
    s.close()  # drops the client, drains, flushes
    with pytest.raises(nbd.Error):
        h.pread(512, 0)
    assert not os.path.exists(sock)
    assert image.read_bytes()[:7] == b"persist"


@needs_libnbd
def test_hard_delete_waits_for_requests_in_flight(session: Session, sock: str) -> None:
    session.qmp("blockdev-add", driver="null-co", node_name="slow", size=1 << 20, latency_ns=500_000_000)
    session.qmp("nbd-server-start", addr=unix_addr(sock))
    session.qmp("block-export-add", type="nbd", id="e", node_name="slow")
    h = connect(sock, name="slow")
    buffer = nbd.Buffer(512)
    h.aio_pread(buffer, 0)  # sent at once; the node answers after 500 ms
    h.poll(0)
    session.qmp("block-export-del", id="e", mode="hard")
    # As qemu-storage-daemon: the command returns at once, the export shuts down in the background.
    assert session.qmp("query-block-exports") == [
        {"id": "e", "type": "nbd", "node-name": "slow", "shutting-down": True}]
    assert session.error("block-export-del", id="e", mode="hard") == \
        ("GenericError", "Export 'e' is already shutting down")
    assert session.error("block-export-add", type="nbd", id="e", node_name="slow") == \
        ("GenericError", "Block export id 'e' is already in use")
    assert session.events("BLOCK_EXPORT_DELETED", timeout=2) == [{"id": "e"}]
    assert session.qmp("query-block-exports") == []
    session.qmp("block-export-add", type="nbd", id="e", node_name="slow")


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio missing (Debian package fio)")
def test_fio_nbd_engine_writes_and_verifies(session: Session, sock: str, tmp_path: Path) -> None:
    """fio's own NBD client (libnbd underneath) writes checksummed 16k blocks in random order at
    queue depth 16 over two connections, then a second run reads every block back and checks it."""
    image = tmp_path / "disk.raw"
    make_image(image, 32 << 20)
    export_file(session, image, sock)
    uri = f"nbd+unix:///disk?socket={sock}"
    job = ["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=16k",
           "--size=16m", "--iodepth=16", "--numjobs=2", "--offset_increment=16m",
           "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--randrepeat=1",
           "--group_reporting", "--output-format=json"]
    for extra in ([], ["--verify_only"]):
        run = subprocess.run(job + extra, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr
        result = json.loads(run.stdout[run.stdout.index("{"):])["jobs"][0]  # after "connected" lines
        assert result["error"] == 0
        assert result["read"]["io_bytes"] == 32 << 20  # every block read back and verified
    # What fio wrote is in the image file itself.
    assert image.read_bytes() != bytes(32 << 20)


def thread_cpu_ticks(name: str) -> int:
    """utime + stime of this process's thread called `name` (engines run in-process here)."""
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                if f.read().strip() != name:
                    continue
            with open(f"/proc/self/task/{task}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])
        except FileNotFoundError:
            continue
    raise AssertionError(f"no thread named {name!r}")


@needs_libnbd
def test_export_in_an_iothread(session: Session, sock: str, tmp_path: Path) -> None:
    """block-export-add iothread=...: the node moves to the iothread and every request of the
    export's clients runs there; the node comes back when the export is gone."""
    image = Path("/dev/shm") / f"blockd-iothread-{os.getpid()}.raw"
    make_image(image, 64 << 20)
    try:
        session.qmp("object-add", qom_type="iothread", id="io0")
        export_file(session, image, sock, iothread="io0")
        h = connect(sock)
        busy_before = thread_cpu_ticks("IO io0")
        block = bytes(range(256)) * 4096  # 1 MiB
        for i in range(300):
            h.pwrite(block, (i % 64) << 20)
            assert h.pread(len(block), (i % 64) << 20) == block
        h.flush()
        # 600 MiB copied in and out of the page cache: far more than a few ticks of CPU, all of
        # it in the iothread.
        assert thread_cpu_ticks("IO io0") - busy_before >= 5
        assert session.error("object-del", id="io0") == \
            ("GenericError", "object 'io0' is in use, can not be deleted")
        # A new parent would open on the main loop while its child runs in the iothread.
        assert session.error("blockdev-add", driver="raw", node_name="raw0", file="file0") == \
            ("GenericError", "Node 'file0' is exported from an iothread and cannot get another parent")
        h.shutdown()
        session.qmp("block-export-del", id="exp0")
        session.events("BLOCK_EXPORT_DELETED")
        session.qmp("object-del", id="io0")  # the node is back on the main loop
        session.qmp("blockdev-del", node_name="file0")
        assert image.read_bytes()[:len(block)] == block
    finally:
        image.unlink()


@needs_libnbd
def test_iothread_export_of_a_shared_node(session: Session, sock: str, tmp_path: Path) -> None:
    """A node that another export uses cannot move: without fixed-iothread the new export stays
    with the node (as QEMU does), with fixed-iothread it fails and leaves nothing behind."""
    image = tmp_path / "disk.raw"
    make_image(image, 1 << 20)
    session.qmp("object-add", qom_type="iothread", id="io0")
    export_file(session, image, sock)  # exp0 on the main loop
    assert session.error("block-export-add", type="nbd", id="e1", node_name="file0", name="n1",
                         iothread="nope") == ("GenericError", 'iothread "nope" not found')
    error_class, desc = session.error("block-export-add", type="nbd", id="e1", node_name="file0",
                                      name="n1", iothread="io0", fixed_iothread=True)
    assert error_class == "GenericError"
    assert "block export 'exp0'" in desc and "cannot move" in desc, desc
    assert [e["id"] for e in session.qmp("query-block-exports")] == ["exp0"]
    session.qmp("block-export-add", type="nbd", id="e1", node_name="file0", name="n1", iothread="io0",
                writable=True)
    h = connect(sock, name="n1")
    h.pwrite(b"shared", 0)
    assert h.pread(6, 0) == b"shared"
    h.shutdown()
    session.qmp("object-del", id="io0")  # nothing moved to it
