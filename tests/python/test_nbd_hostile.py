"""Malformed and hostile NBD traffic: raw sockets send what no well-behaved client would, and the
server gives the spec's answer or drops that client, while other clients carry on and nothing
leaks (file descriptors are counted across thousands of connections).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator

import pytest

from blockd.testing import nbd_wire

from blockd.testing.clients import import_core, import_libnbd

core = import_core()
nbd = import_libnbd()

needs_libnbd = pytest.mark.skipif(nbd is None, reason="python3-libnbd (module nbd) is not installed")

OPT_GO, OPT_LIST, OPT_STRUCTURED_REPLY = nbd_wire.OPT_GO, nbd_wire.OPT_LIST, nbd_wire.OPT_STRUCTURED_REPLY
REP_ERR_TOO_BIG, REP_ERR_INVALID = nbd_wire.REP_ERR_TOO_BIG, nbd_wire.REP_ERR_INVALID
CMD_READ, CMD_WRITE = nbd_wire.CMD_READ, nbd_wire.CMD_WRITE
EINVAL = nbd_wire.EINVAL
# The hand-driven client (compact headers, simple replies unless a test negotiates more).
Raw = nbd_wire.WireClient


def qmp(engine: Any, command: str, **arguments: Any) -> Any:
    request = {"execute": command, "arguments": {k.replace("_", "-"): v for k, v in arguments.items()}}
    reply = json.loads(engine.execute(json.dumps(request)))
    assert "error" not in reply, reply
    return reply["return"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    engine = core.Engine()
    sock = str(tmp_path / "nbd.sock")
    qmp(engine, "blockdev-add", driver="null-co", node_name="n0", size=64 << 20)
    qmp(engine, "nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    qmp(engine, "block-export-add", type="nbd", id="e", node_name="n0", writable=True)
    yield sock
    engine.shutdown()


def healthy(sock: str) -> None:
    """A fresh client gets full service."""
    c = Raw(sock)
    c.greet()
    c.go()
    c.request(CMD_READ, 0, 4096, 7)
    assert c.simple_reply() == (0, 7)
    assert len(c.recv(4096)) == 4096
    c.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_wrong_option_magic_drops_only_that_client(server: str) -> None:
    other = Raw(server)
    other.greet()
    other.go()
    bad = Raw(server)
    bad.greet()
    bad.s.sendall(struct.pack(">QII", 0x1122334455667788, OPT_LIST, 0))
    assert bad.at_eof()
    other.request(CMD_READ, 0, 512, 1)
    assert other.simple_reply() == (0, 1)
    healthy(server)


def test_oversized_and_malformed_options(server: str) -> None:
    c = Raw(server)
    c.greet()
    # Longer than the server reads into memory: skipped and refused, the session goes on.
    c.option(OPT_LIST, b"\0" * (1 << 20))
    assert c.reply()[1] == REP_ERR_TOO_BIG
    c.option(OPT_STRUCTURED_REPLY, b"x")
    assert c.reply()[1] == REP_ERR_INVALID
    c.option(OPT_GO, struct.pack(">I", 100) + b"n0")  # name length beyond the payload
    assert c.reply()[1] == REP_ERR_INVALID
    c.go()
    c.request(CMD_READ, 0, 512, 3)
    assert c.simple_reply() == (0, 3)


def test_truncated_option_then_vanish(server: str) -> None:
    c = Raw(server)
    c.greet()
    c.option(OPT_GO, b"\0\0", declared=100)
    c.close()
    healthy(server)


def test_oversized_requests(server: str) -> None:
    c = Raw(server)
    c.greet()
    c.go()
    c.request(CMD_READ, 0, (32 << 20) + 1, 1)
    assert c.simple_reply() == (EINVAL, 1)
    c.request(CMD_READ, 64 << 20, 1, 2)
    assert c.simple_reply() == (EINVAL, 2)
    # A write beyond the payload limit: its payload is consumed and refused.
    c.request(CMD_WRITE, 0, (32 << 20) + 4096, 3, b"\0" * ((32 << 20) + 4096))
    assert c.simple_reply() == (EINVAL, 3)
    c.request(CMD_READ, 0, 512, 4)
    assert c.simple_reply() == (0, 4)


def test_vanish_mid_request_and_mid_reply(server: str) -> None:
    c = Raw(server)
    c.greet()
    c.go()
    c.request(CMD_WRITE, 0, 1 << 20, 1, b"\1" * (1 << 19))  # half the payload
    c.close()
    c = Raw(server)
    c.greet()
    c.go()
    for cookie in range(8):
        c.request(CMD_READ, 0, 32 << 20, cookie)  # 256 MiB of replies nobody reads
    c.close()
    healthy(server)


def test_connect_disconnect_cycles_do_not_leak(server: str) -> None:
    healthy(server)
    before = open_fds()
    for i in range(2000):
        c = Raw(server)
        if i % 3 == 0:
            c.greet()
        if i % 3 == 1:
            c.greet()
            c.go()
        c.close()
    healthy(server)
    assert open_fds() <= before + 2


@needs_libnbd
def test_many_clients_in_parallel(server: str) -> None:
    handles = []
    for _ in range(32):
        h = nbd.NBD()
        h.set_export_name("n0")
        h.connect_unix(server)
        handles.append(h)
    for i, h in enumerate(handles):
        h.pwrite(bytes([i]) * 4096, i * 4096)
    for h in handles:
        assert h.pread(4096, 0) == bytes(4096)  # null-co stores nothing
        h.shutdown()
