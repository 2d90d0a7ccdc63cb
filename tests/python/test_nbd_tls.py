"""NBD over TLS: tls-creds-x509 and tls-creds-psk objects and nbd-server-start tls-creds, checked
with real clients (libnbd, nbdinfo, qemu-img, qemu-io, Python's ssl module speaking the wire
protocol) and against qemu-storage-daemon 7.2 with the same certificates and keys.

The certificates are made at test time with openssl (blockd.testing.pki): a CA with a server and
a client certificate, and a second, unrelated CA ("rogue") whose client must be refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from blockd.testing.clients import import_core, import_libnbd
from blockd.testing.nbd_wire import (
    CMD_READ,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_LIST,
    OPT_STARTTLS,
    REP_ACK,
    REP_ERR_INVALID,
    REP_SERVER,
    WireClient,
)
from blockd.testing.pki import Pki, have_openssl, make_pki
from blockd.testing.process import QSD, DaemonProcess

core = import_core()
nbd = import_libnbd()

pytestmark = pytest.mark.skipif(not have_openssl(), reason="openssl is not installed (Debian package openssl)")

REP_ERR_TLS_REQD = (1 << 31) + 5
IMAGE_SIZE = 8 << 20
needs_libnbd = pytest.mark.skipif(nbd is None, reason="python3-libnbd (module nbd) is not installed")
needs_qsd = pytest.mark.skipif(not os.access(QSD, os.X_OK), reason=f"{QSD} is not installed (qemu-system-common)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pki, Pki]:
    base = tmp_path_factory.mktemp("pki")
    return make_pki(base / "good"), make_pki(base / "rogue", name="rogue CA")


def execute(engine: Any, command: str, **arguments: Any) -> dict[str, Any]:
    request = {"execute": command, "arguments": {k.replace("_", "-"): v for k, v in arguments.items()}}
    reply: dict[str, Any] = json.loads(engine.execute(json.dumps(request)))
    return reply


def qmp(engine: Any, command: str, **arguments: Any) -> Any:
    reply = execute(engine, command, **arguments)
    assert "error" not in reply, reply
    return reply["return"]


def make_image(path: Path) -> bytes:
    """A sparse image with random data in [1 MiB, 3 MiB); returns its whole content."""
    data = os.urandom(2 << 20)
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
        f.seek(1 << 20)
        f.write(data)
    return path.read_bytes()


class Served:
    def __init__(self, engine: Any, sock: str, image: Path, content: bytes) -> None:
        self.engine, self.sock, self.image, self.content = engine, sock, image, content


@pytest.fixture
def served(pki: tuple[Pki, Pki], tmp_path: Path) -> Iterator[Served]:
    """A writable raw image exported by an in-process engine over a TLS-only NBD server."""
    good, _ = pki
    image = tmp_path / "disk.raw"
    content = make_image(image)
    sock = str(tmp_path / "nbd.sock")
    engine = core.Engine()
    try:
        qmp(engine, "object-add", qom_type="tls-creds-x509", id="tls0", dir=str(good.server_dir),
            endpoint="server")
        qmp(engine, "blockdev-add", driver="file", node_name="disk", filename=str(image))
        qmp(engine, "nbd-server-start", addr={"type": "unix", "data": {"path": sock}}, tls_creds="tls0")
        qmp(engine, "block-export-add", type="nbd", id="e", node_name="disk", writable=True)
        yield Served(engine, sock, image, content)
    finally:
        engine.shutdown()


def tls_handle(sock: str, certificates: Path, tls: int | None = None) -> Any:
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE if tls is None else tls)
    h.set_tls_certificates(str(certificates))
    h.set_export_name("disk")
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(sock)
    return h


def assert_serving(served: Served, pki: tuple[Pki, Pki]) -> None:
    """A fresh TLS client still reads the right data (the server carried on)."""
    if nbd is not None:
        h = tls_handle(served.sock, pki[0].client_dir)
        assert h.pread(1 << 20, 1 << 20) == served.content[1 << 20:2 << 20]
        h.shutdown()
    else:
        out = subprocess.run(["nbdinfo", "--size", uri(served.sock, pki[0].client_dir)],
                             check=True, capture_output=True, text=True).stdout
        assert int(out) == IMAGE_SIZE


def uri(sock: str, certificates: Path) -> str:
    return f"nbds+unix:///disk?socket={sock}&tls-certificates={certificates}"


@needs_libnbd
def test_libnbd_reads_writes_and_block_status_over_tls(served: Served, pki: tuple[Pki, Pki]) -> None:
    h = tls_handle(served.sock, pki[0].client_dir)
    assert h.get_tls_negotiated()
    assert h.get_structured_replies_negotiated()
    assert h.pread(IMAGE_SIZE, 0) == served.content
    new = os.urandom(3 << 20)  # larger than one TLS record and than the socket buffers
    h.pwrite(new, 4 << 20)
    h.pwrite(b"\xa5" * 4096, 512, nbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(len(new), 4 << 20) == new
    expected = bytearray(served.content)
    expected[4 << 20:7 << 20] = new
    expected[512:512 + 4096] = b"\xa5" * 4096
    assert served.image.read_bytes() == bytes(expected)
    extents: list[tuple[int, int]] = []

    def collect(context: str, offset: int, entries: list[int], error: Any) -> int:
        if context == nbd.CONTEXT_BASE_ALLOCATION:
            extents.extend(zip(entries[0::2], entries[1::2]))
        return 0

    offset = 0
    while offset < IMAGE_SIZE:
        before = sum(length for length, _ in extents)
        h.block_status(IMAGE_SIZE - offset, offset, collect)
        offset += sum(length for length, _ in extents) - before
    assert offset == IMAGE_SIZE
    # The region past the write was never written: a hole that reads as zeroes.
    position = 0
    flags_at_end = None
    for length, flags in extents:
        if position <= IMAGE_SIZE - 4096 < position + length:
            flags_at_end = flags
        position += length
    assert flags_at_end == nbd.STATE_HOLE | nbd.STATE_ZERO
    h.shutdown()


def test_nbdinfo_over_tls(served: Served, pki: tuple[Pki, Pki]) -> None:
    if shutil.which("nbdinfo") is None:
        pytest.skip("nbdinfo is not installed (libnbd-bin)")
    info = json.loads(subprocess.run(["nbdinfo", "--json", uri(served.sock, pki[0].client_dir)],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == IMAGE_SIZE
    mapped = json.loads(subprocess.run(["nbdinfo", "--map", "--json", uri(served.sock, pki[0].client_dir)],
                                       check=True, capture_output=True, text=True).stdout)
    assert any(extent["type"] == 0 and extent["offset"] <= 1 << 20 < extent["offset"] + extent["length"]
               for extent in mapped)


def qemu_nbd_opts(served: Served) -> str:
    return f"driver=nbd,server.type=unix,server.path={served.sock},export=disk,tls-creds=tls0,tls-hostname=localhost"


def test_qemu_img_and_qemu_io_over_tls(served: Served, pki: tuple[Pki, Pki], tmp_path: Path) -> None:
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.skip("qemu-img/qemu-io are not installed (qemu-utils)")
    creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={pki[0].client_dir}"
    copy = tmp_path / "copy.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", "--object", creds, "--image-opts",
                    qemu_nbd_opts(served), str(copy)], check=True, capture_output=True)
    assert copy.read_bytes() == served.content
    io = subprocess.run(["qemu-io", "--object", creds, "--image-opts", qemu_nbd_opts(served),
                         "-c", "write -P 0x5a 6M 256k", "-c", "read -P 0x5a 6M 256k",
                         "-c", "read -P 0 7M 64k"], capture_output=True, text=True)
    assert io.returncode == 0, io.stderr
    assert "failed" not in io.stdout + io.stderr, io.stdout + io.stderr
    assert served.image.read_bytes()[6 << 20:(6 << 20) + (256 << 10)] == b"\x5a" * (256 << 10)


def test_options_before_starttls_are_refused(served: Served, pki: tuple[Pki, Pki]) -> None:
    c = WireClient(served.sock)
    c.greet()
    for option in (OPT_LIST, OPT_GO, 0x1234):
        c.option(option, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0) if option == OPT_GO else b"")
        assert c.reply()[1] == REP_ERR_TLS_REQD
    c.option(OPT_STARTTLS, b"x")
    assert c.reply()[1] == REP_ERR_INVALID
    # EXPORT_NAME cannot carry an error: the server hangs up.
    c.option(OPT_EXPORT_NAME, b"disk")
    assert c.at_eof()
    c.close()
    if nbd is not None:
        plain = nbd.NBD()
        plain.set_export_name("disk")
        with pytest.raises(nbd.Error):
            plain.connect_unix(served.sock)
    assert_serving(served, pki)


def tls_wrap(c: WireClient, certificates: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(certificates / "ca-cert.pem"))
    context.load_cert_chain(str(certificates / "client-cert.pem"), str(certificates / "client-key.pem"))
    c.s = context.wrap_socket(c.s, server_hostname="localhost")


def test_starttls_then_options_and_data_over_tls(served: Served, pki: tuple[Pki, Pki]) -> None:
    c = WireClient(served.sock)
    c.greet()
    c.option(OPT_STARTTLS)
    assert c.reply()[1] == REP_ACK
    tls_wrap(c, pki[0].client_dir)
    c.option(OPT_STARTTLS)  # a second upgrade is invalid
    assert c.reply()[1] == REP_ERR_INVALID
    c.option(OPT_LIST)
    kind, payload = c.reply()[1:]
    assert (kind, payload[4:]) == (REP_SERVER, b"disk")
    assert c.reply()[1] == REP_ACK
    c.go(b"disk")
    assert c.export_size == IMAGE_SIZE
    c.request(CMD_READ, 1 << 20, 4096, 7)
    error, cookie = c.simple_reply()
    assert (error, cookie) == (0, 7)
    assert c.recv_exact(4096) == served.content[1 << 20:(1 << 20) + 4096]
    c.close()


def test_refused_handshakes_leave_the_server_running(served: Served, pki: tuple[Pki, Pki]) -> None:
    good, rogue = pki
    if nbd is not None:
        with pytest.raises(nbd.Error):
            tls_handle(served.sock, rogue.client_dir)  # a client of another CA
    # Plaintext garbage where the TLS handshake should be.
    c = WireClient(served.sock)
    c.greet()
    c.option(OPT_STARTTLS)
    assert c.reply()[1] == REP_ACK
    c.s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 4)
    assert c.at_eof()
    c.close()
    # A client that vanishes halfway through its ClientHello.
    c = WireClient(served.sock)
    c.greet()
    c.option(OPT_STARTTLS)
    assert c.reply()[1] == REP_ACK
    c.s.sendall(bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01]))
    c.close()
    # A client whose certificate the server cannot verify, via Python's ssl.
    c = WireClient(served.sock)
    c.greet()
    c.option(OPT_STARTTLS)
    assert c.reply()[1] == REP_ACK
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(str(good.client_dir / "ca-cert.pem"))
        context.load_cert_chain(str(rogue.client_dir / "client-cert.pem"), str(rogue.client_dir / "client-key.pem"))
        c.s = context.wrap_socket(c.s, server_hostname="localhost")
        c.option(OPT_LIST)
        c.reply()
    c.close()
    assert_serving(served, pki)
    assert qmp(served.engine, "query-block-exports")[0]["id"] == "e"


def test_object_del_of_creds_in_use_and_authz(served: Served, pki: tuple[Pki, Pki], tmp_path: Path) -> None:
    # As in qemu-storage-daemon: deleting the object leaves the running server with its credentials.
    qmp(served.engine, "object-del", id="tls0")
    assert_serving(served, pki)
    qmp(served.engine, "nbd-server-stop")
    qmp(served.engine, "object-add", qom_type="tls-creds-x509", id="tls1", dir=str(pki[0].server_dir),
        endpoint="server")
    # An authorization object is looked up when a client connects; blockd has none, so every TLS
    # client is dropped after its handshake.
    qmp(served.engine, "nbd-server-start", addr={"type": "unix", "data": {"path": served.sock}},
        tls_creds="tls1", tls_authz="authz0")
    qmp(served.engine, "nbd-server-add", device="disk", name="disk")
    if nbd is not None:
        with pytest.raises(nbd.Error):
            tls_handle(served.sock, pki[0].client_dir)


def test_verify_peer_off_accepts_a_client_without_certificate(pki: tuple[Pki, Pki], tmp_path: Path) -> None:
    if nbd is None:
        pytest.skip("python3-libnbd (module nbd) is not installed")
    image = tmp_path / "disk.raw"
    content = make_image(image)
    anonymous = tmp_path / "anonymous"
    anonymous.mkdir()
    shutil.copy(pki[0].ca_cert, anonymous / "ca-cert.pem")
    sock = str(tmp_path / "nbd.sock")
    engine = core.Engine()
    try:
        for name, verify in (("strict", True), ("lax", False)):
            qmp(engine, "object-add", qom_type="tls-creds-x509", id=name, dir=str(pki[0].server_dir),
                endpoint="server", verify_peer=verify)
        qmp(engine, "blockdev-add", driver="file", node_name="disk", filename=str(image))
        qmp(engine, "nbd-server-start", addr={"type": "unix", "data": {"path": sock}}, tls_creds="strict")
        qmp(engine, "nbd-server-add", device="disk", name="disk")
        with pytest.raises(nbd.Error):
            tls_handle(sock, anonymous)
        qmp(engine, "nbd-server-stop")
        qmp(engine, "nbd-server-start", addr={"type": "unix", "data": {"path": sock}}, tls_creds="lax")
        qmp(engine, "nbd-server-add", device="disk", name="disk")
        h = tls_handle(sock, anonymous)
        assert h.pread(4096, 1 << 20) == content[1 << 20:(1 << 20) + 4096]
        h.shutdown()
    finally:
        engine.shutdown()


@needs_qsd
def test_qmp_errors_match_qsd(pki: tuple[Pki, Pki], tmp_path: Path) -> None:
    good, _ = pki
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ca-cert.pem").write_text("not a certificate\n")
    (broken / "server-cert.pem").write_text("x")
    (broken / "server-key.pem").write_text("x")
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    shutil.copy(good.ca_cert, mismatched / "ca-cert.pem")
    shutil.copy(good.server_dir / "server-cert.pem", mismatched / "server-cert.pem")
    shutil.copy(good.client_dir / "client-key.pem", mismatched / "server-key.pem")
    sock = str(tmp_path / "n.sock")
    x509 = {"qom-type": "tls-creds-x509"}
    steps: list[tuple[str, dict[str, Any]]] = [
        ("object-add", {**x509, "id": "a", "endpoint": "server"}),
        ("object-add", {**x509, "id": "a", "dir": str(tmp_path / "nowhere"), "endpoint": "server"}),
        ("object-add", {**x509, "id": "a", "dir": str(good.client_dir), "endpoint": "server"}),
        ("object-add", {**x509, "id": "a", "dir": str(broken), "endpoint": "server"}),
        ("object-add", {**x509, "id": "a", "dir": str(mismatched), "endpoint": "server"}),
        ("object-add", {**x509, "id": "a", "dir": str(good.server_dir), "endpoint": "server", "passwordid": "s0"}),
        ("object-add", {**x509, "id": "srv", "dir": str(good.server_dir), "endpoint": "server"}),
        ("object-add", {**x509, "id": "srv", "dir": str(good.server_dir), "endpoint": "server"}),
        ("object-add", {**x509, "id": "cli", "dir": str(good.client_dir), "endpoint": "client"}),
        ("object-add", {**x509, "id": "dflt", "dir": str(good.server_dir)}),
        ("object-add", {"qom-type": "iothread", "id": "io0"}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}, "tls-creds": "nosuch"}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}, "tls-creds": "cli"}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}, "tls-creds": "dflt"}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}, "tls-creds": "io0"}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}, "tls-creds": "srv"}),
        ("object-del", {"id": "srv"}),
        ("object-del", {"id": "srv"}),
        ("nbd-server-stop", {}),
    ]

    def outcomes(send: Any) -> list[Any]:
        results = []
        for command, arguments in steps:
            reply = send(command, arguments)
            results.append(reply.get("error", "ok"))
        return results

    reference = DaemonProcess([], command=[QSD], directory=tmp_path).start()
    try:
        assert reference.qmp is not None
        expected = outcomes(lambda command, arguments: reference.qmp.cmd(command, arguments))
    finally:
        reference.stop()
        reference.close()
    engine = core.Engine()
    try:
        actual = outcomes(lambda command, arguments: json.loads(
            engine.execute(json.dumps({"execute": command, "arguments": arguments}))))
    finally:
        engine.shutdown()
    assert actual == expected


def daemon_args(pki_dir: Path, image: Path, sock: Path) -> list[str]:
    return [
        "--object", f"tls-creds-x509,id=tls0,dir={pki_dir},endpoint=server,verify-peer=on",
        "--blockdev", f"file,node-name=disk,filename={image},locking=off",
        "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=tls0",
        "--export", "nbd,id=e,node-name=disk,writable=on",
    ]


@needs_qsd
def test_daemon_cli_matches_qsd_for_clients(daemon: Any, pki: tuple[Pki, Pki], tmp_path: Path) -> None:
    """--object tls-creds-x509 and --nbd-server tls-creds; clients see the same from both daemons."""
    if shutil.which("nbdinfo") is None:
        pytest.skip("nbdinfo is not installed (libnbd-bin)")
    good, rogue = pki
    image = tmp_path / "disk.raw"
    make_image(image)
    socks = {"blockd": tmp_path / "blockd.sock", "qsd": tmp_path / "qsd.sock"}
    daemon(*daemon_args(good.server_dir, image, socks["blockd"]))
    reference = DaemonProcess(daemon_args(good.server_dir, image, socks["qsd"]), command=[QSD],
                              directory=tmp_path).start()
    try:
        seen = {}
        for name, sock in socks.items():
            info = json.loads(subprocess.run(["nbdinfo", "--json", uri(str(sock), good.client_dir)],
                                             check=True, capture_output=True, text=True).stdout)
            for export in info["exports"]:
                export.pop("uri", None)
            mapped = subprocess.run(["nbdinfo", "--map", uri(str(sock), good.client_dir)],
                                    check=True, capture_output=True, text=True).stdout
            refused = [subprocess.run(["nbdinfo", "--size", target], capture_output=True).returncode
                       for target in (uri(str(sock), rogue.client_dir), f"nbd+unix:///disk?socket={sock}")]
            # Raw wire: the option replies before STARTTLS.
            c = WireClient(str(sock))
            c.greet()
            c.option(OPT_LIST)
            listed = c.reply()[1]
            c.option(OPT_STARTTLS)
            started = c.reply()[1]
            c.close()
            seen[name] = (info, mapped, refused, listed, started)
        assert seen["blockd"] == seen["qsd"]
        assert seen["blockd"][2] == [1, 1]
    finally:
        reference.stop()
        reference.close()


def test_a_tcp_listener_with_tls(pki: tuple[Pki, Pki], tmp_path: Path) -> None:
    if nbd is None:
        pytest.skip("python3-libnbd (module nbd) is not installed")
    image = tmp_path / "disk.raw"
    content = make_image(image)
    engine = core.Engine()
    try:
        qmp(engine, "object-add", qom_type="tls-creds-x509", id="tls0", dir=str(pki[0].server_dir),
            endpoint="server")
        qmp(engine, "blockdev-add", driver="file", node_name="disk", filename=str(image))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        qmp(engine, "nbd-server-start", tls_creds="tls0",
            addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}})
        qmp(engine, "nbd-server-add", device="disk", name="disk")
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(pki[0].client_dir))
        h.set_export_name("disk")
        h.connect_tcp("127.0.0.1", str(port))
        assert h.pread(IMAGE_SIZE, 0) == content
        h.shutdown()
    finally:
        engine.shutdown()


# ---- Pre-shared keys (tls-creds-psk).


def psk_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A server directory with two users' keys and a client directory with alice's."""
    server, client = tmp_path / "psk-server", tmp_path / "psk-client"
    server.mkdir()
    client.mkdir()
    alice = os.urandom(32).hex()
    (server / "keys.psk").write_text(f"bob:{os.urandom(32).hex()}\nalice:{alice}\n")
    (client / "keys.psk").write_text(f"alice:{alice}\n")
    return server, client


def test_psk_clients(tmp_path: Path) -> None:
    server_dir, client_dir = psk_dirs(tmp_path)
    image = tmp_path / "disk.raw"
    content = make_image(image)
    sock = str(tmp_path / "nbd.sock")
    engine = core.Engine()
    try:
        qmp(engine, "object-add", qom_type="tls-creds-psk", id="psk0", dir=str(server_dir), endpoint="server")
        qmp(engine, "blockdev-add", driver="file", node_name="disk", filename=str(image))
        qmp(engine, "nbd-server-start", addr={"type": "unix", "data": {"path": sock}}, tls_creds="psk0")
        qmp(engine, "nbd-server-add", device="disk", name="disk", writable=True)
        if nbd is not None:
            h = nbd.NBD()
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_tls_psk_file(str(client_dir / "keys.psk"))
            h.set_tls_username("alice")
            h.set_export_name("disk")
            h.connect_unix(sock)
            assert h.get_tls_negotiated()
            assert h.pread(IMAGE_SIZE, 0) == content
            h.shutdown()
            intruder = nbd.NBD()
            intruder.set_tls(nbd.TLS_REQUIRE)
            (tmp_path / "wrong.psk").write_text(f"alice:{os.urandom(32).hex()}\n")
            intruder.set_tls_psk_file(str(tmp_path / "wrong.psk"))
            intruder.set_tls_username("alice")
            intruder.set_export_name("disk")
            with pytest.raises(nbd.Error):
                intruder.connect_unix(sock)
        if shutil.which("qemu-io") is not None:
            io = subprocess.run(
                ["qemu-io", "--object", f"tls-creds-psk,id=tls0,endpoint=client,dir={client_dir},username=alice",
                 "--image-opts", f"driver=nbd,server.type=unix,server.path={sock},export=disk,tls-creds=tls0",
                 "-c", "write -P 0x3c 0 64k", "-c", "read -P 0x3c 0 64k"], capture_output=True, text=True)
            assert io.returncode == 0 and "failed" not in io.stdout + io.stderr, io.stdout + io.stderr
            assert image.read_bytes()[:65536] == b"\x3c" * 65536
    finally:
        engine.shutdown()


@needs_qsd
def test_psk_qmp_errors_match_qsd(tmp_path: Path) -> None:
    server_dir, client_dir = psk_dirs(tmp_path)
    psk = {"qom-type": "tls-creds-psk"}
    steps = [
        {**psk, "id": "a", "endpoint": "server"},
        {**psk, "id": "a", "dir": str(tmp_path / "nowhere"), "endpoint": "server"},
        {**psk, "id": "a", "dir": str(server_dir), "endpoint": "server", "username": "alice"},
        {**psk, "id": "a", "dir": str(client_dir), "endpoint": "client"},
        {**psk, "id": "a", "dir": str(client_dir), "endpoint": "client", "username": "bob"},
        {**psk, "id": "srv", "dir": str(server_dir), "endpoint": "server"},
        {**psk, "id": "cli", "dir": str(client_dir), "endpoint": "client", "username": "alice"},
    ]
    reference = DaemonProcess([], command=[QSD], directory=tmp_path).start()
    try:
        assert reference.qmp is not None
        expected = [reference.qmp.cmd("object-add", step).get("error", "ok") for step in steps]
        expected.append(reference.qmp.cmd("nbd-server-start", {
            "addr": {"type": "unix", "data": {"path": str(tmp_path / "q.sock")}}, "tls-creds": "cli"}).get("error", "ok"))
    finally:
        reference.stop()
        reference.close()
    engine = core.Engine()
    try:
        actual = [execute(engine, "object-add", **step).get("error", "ok") for step in steps]
        actual.append(execute(engine, "nbd-server-start", tls_creds="cli",
                              addr={"type": "unix", "data": {"path": str(tmp_path / "b.sock")}}).get("error", "ok"))
    finally:
        engine.shutdown()
    assert actual == expected



# ---- The nbd client driver with TLS.


def client_engine(pki_client_dir: Path, tmp_path: Path) -> tuple[Any, str]:
    """An engine with client credentials tls-cli and a plaintext NBD server; returns it and the
    server's socket."""
    engine = core.Engine()
    sock = str(tmp_path / "re-export.sock")
    qmp(engine, "object-add", qom_type="tls-creds-x509", id="tls-cli", dir=str(pki_client_dir), endpoint="client")
    qmp(engine, "nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    return engine, sock


@needs_libnbd
def test_client_driver_reads_and_writes_over_tls(served: Served, pki: tuple[Pki, Pki], tmp_path: Path) -> None:
    engine, sock = client_engine(pki[0].client_dir, tmp_path)
    try:
        qmp(engine, "blockdev-add", driver="nbd", node_name="remote", export="disk", tls_creds="tls-cli",
            tls_hostname="localhost", server={"type": "unix", "path": served.sock})
        qmp(engine, "nbd-server-add", device="remote", name="remote", writable=True)
        h = nbd.NBD()
        h.set_export_name("remote")
        h.connect_unix(sock)
        assert h.pread(IMAGE_SIZE, 0) == served.content
        new = os.urandom(1 << 20)
        h.pwrite(new, 5 << 20)
        h.flush()
        h.shutdown()
        assert served.image.read_bytes()[5 << 20:6 << 20] == new
    finally:
        engine.shutdown()


def test_client_driver_refusals(served: Served, pki: tuple[Pki, Pki], tmp_path: Path) -> None:
    good, rogue = pki
    engine, plain_sock = client_engine(good.client_dir, tmp_path)
    try:
        qmp(engine, "object-add", qom_type="tls-creds-x509", id="tls-srv", dir=str(good.server_dir), endpoint="server")
        qmp(engine, "object-add", qom_type="tls-creds-x509", id="tls-rogue", dir=str(rogue.client_dir),
            endpoint="client")
        server = {"type": "unix", "path": served.sock}

        def error(**options: Any) -> str:
            reply = execute(engine, "blockdev-add", driver="nbd", node_name="x", export="disk", server=server,
                            **options)
            assert "error" in reply, reply
            return str(reply["error"]["desc"])

        assert error(tls_creds="tls-srv", tls_hostname="localhost") == \
            "Expected TLS credentials for a client endpoint"
        assert error(tls_creds="tls-cli") == "No hostname for certificate validation"
        assert error(tls_creds="tls-rogue", tls_hostname="localhost").startswith("TLS handshake failed")
        assert error(tls_creds="tls-cli", tls_hostname="elsewhere.example").startswith("TLS handshake failed")
        # A TLS-only server and a plaintext client; a plaintext server and a TLS client.
        assert "NBD_REP_ERR_TLS_REQD" in error()
        server = {"type": "unix", "path": plain_sock}
        assert error(tls_creds="tls-cli", tls_hostname="localhost") == \
            "Server refused NBD_OPT_STARTTLS (NBD_REP_ERR_POLICY): TLS is not enabled on this server"
        assert_serving(served, pki)
    finally:
        engine.shutdown()


@contextlib.contextmanager
def client_driver_on_tls_qemu_nbd(pki: tuple[Pki, Pki], tmp_path: Path, **options):
    """qemu-nbd serving a fresh image with TLS, and an engine whose nbd client driver node
    (`options` added to its blockdev-add) is re-exported as "remote"; yields (qemu-nbd, image
    content, a libnbd handle connected to the re-export)."""
    if shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-nbd is not installed (qemu-utils)")
    from blockd.testing.nbd_servers import qemu_nbd

    image = tmp_path / "disk.raw"
    content = make_image(image)
    server = qemu_nbd(image, tmp_path / "qemu-nbd.sock", "--object",
                      f"tls-creds-x509,id=tls0,endpoint=server,dir={pki[0].server_dir}", "--tls-creds", "tls0").start()
    engine, sock = client_engine(pki[0].client_dir, tmp_path)
    try:
        qmp(engine, "blockdev-add", driver="nbd", node_name="remote", export="exp", tls_creds="tls-cli",
            tls_hostname="localhost", server={"type": "unix", "path": str(server.sock)}, **options)
        qmp(engine, "nbd-server-add", device="remote", name="remote")
        h = nbd.NBD()
        h.set_export_name("remote")
        h.connect_unix(sock)
        yield server, content, h
        h.shutdown()
    finally:
        engine.shutdown()
        server.kill()


@needs_libnbd
def test_client_driver_against_qemu_nbd_with_tls(pki: tuple[Pki, Pki], tmp_path: Path) -> None:
    with client_driver_on_tls_qemu_nbd(pki, tmp_path) as (_, content, h):
        assert h.pread(IMAGE_SIZE, 0) == content


@needs_libnbd
def test_client_driver_reconnects_with_tls(pki: tuple[Pki, Pki], tmp_path: Path) -> None:
    with client_driver_on_tls_qemu_nbd(pki, tmp_path, reconnect_delay=20) as (server, content, h):
        assert h.pread(1 << 20, 1 << 20) == content[1 << 20:2 << 20]
        server.kill()
        server.start()
        # The request waits for the driver to connect again, with a new TLS session.
        assert h.pread(1 << 20, 2 << 20) == content[2 << 20:3 << 20]
