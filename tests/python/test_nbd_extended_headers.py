"""NBD extended headers (NBD_OPT_EXTENDED_HEADERS): 32-byte requests with 64-bit lengths and
32-byte reply chunks, spoken by a hand-driven client because the installed libnbd (1.14) and
QEMU (7.2) predate them. Clients that do not ask keep the compact headers (every other NBD test);
here libnbd re-reads what the extended client wrote.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Iterator

import pytest

import blockd
from blockd.testing.clients import import_core, import_libnbd
from blockd.testing.nbd_wire import (
    CMD_BLOCK_STATUS, CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_PAYLOAD_LEN, CMD_FLAG_REQ_ONE, CMD_FLUSH,
    CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, EINVAL, EPERM, EXTENDED_REPLY_MAGIC,
    FLAG_BLOCK_STATUS_PAYLOAD, FLAG_SEND_DF, INFO_BLOCK_SIZE, OPT_EXPORT_NAME, OPT_EXTENDED_HEADERS,
    OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_EXT_HEADER_REQD, REP_ERR_INVALID, REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS_EXT, REPLY_TYPE_ERROR, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE, STATE_HOLE, STATE_ZERO, WireClient,
)

import_core()  # skips the module when the engine is not built
nbd = import_libnbd()

SIZE = 8 << 30  # above 4 GiB, so that one extended request can cover more than a compact one


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """A sparse 8 GiB file exported writable as "disk" and read-only as "ro"."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    sock = str(tmp_path / "nbd.sock")
    with blockd.Engine() as engine:
        engine.qmp("blockdev-add", driver="file", node_name="disk", filename=str(image))
        engine.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        engine.qmp("block-export-add", type="nbd", id="e", node_name="disk", writable=True)
        engine.qmp("block-export-add", type="nbd", id="ro", node_name="disk", name="ro")
        yield sock


def extended_client(sock: str, name: bytes = b"disk", meta: bool = True) -> WireClient:
    c = WireClient(sock)
    c.greet()
    assert c.simple_option(OPT_EXTENDED_HEADERS) == REP_ACK
    if meta:
        assert c.set_meta_context(name, b"base:allocation") == [(1, b"base:allocation")]
    c.go(name)
    return c


def single(c: WireClient, read_length: int = 0) -> Any:
    reply = c.read_reply(read_length)
    assert len(reply.chunks) == 1
    return reply.chunks[0]


def test_negotiation(server: str) -> None:
    c = WireClient(server)
    c.greet()
    c.option(OPT_EXTENDED_HEADERS, b"x")
    assert c.reply()[1] == REP_ERR_INVALID
    assert c.simple_option(OPT_EXTENDED_HEADERS) == REP_ACK
    # No way back to structured replies once extended headers are on.
    assert c.simple_option(OPT_STRUCTURED_REPLY) == REP_ERR_EXT_HEADER_REQD
    infos = c.go(b"disk", (INFO_BLOCK_SIZE,))
    assert INFO_BLOCK_SIZE in infos
    assert c.export_size == SIZE
    assert c.transmission_flags & FLAG_SEND_DF
    # The payload form of block status needs a selected metadata context.
    assert not c.transmission_flags & FLAG_BLOCK_STATUS_PAYLOAD
    c.close()

    c = extended_client(server)
    assert c.transmission_flags & FLAG_BLOCK_STATUS_PAYLOAD
    c.close()

    # Structured replies first, then extended headers: allowed, and extended wins.
    c = WireClient(server)
    c.greet()
    assert c.simple_option(OPT_STRUCTURED_REPLY) == REP_ACK
    assert c.simple_option(OPT_EXTENDED_HEADERS) == REP_ACK
    c.go(b"disk")
    c.request(CMD_FLUSH, 0, 0, 1)
    chunk = single(c)
    assert (chunk.type, chunk.flags, chunk.cookie) == (REPLY_TYPE_NONE, REPLY_FLAG_DONE, 1)
    c.close()


def test_export_name_is_refused_after_extended_headers(server: str) -> None:
    c = WireClient(server)
    c.greet()
    assert c.simple_option(OPT_EXTENDED_HEADERS) == REP_ACK
    c.option(OPT_EXPORT_NAME, b"disk")
    assert c.at_eof()


def test_read_write_round_trip(server: str) -> None:
    c = extended_client(server)
    data = bytes(range(256)) * 256  # 64 KiB
    offset = (5 << 30) + 4096  # beyond 4 GiB
    c.request(CMD_WRITE, offset, len(data), 1, data, flags=CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_FUA)
    chunk = single(c)
    # Every reply is an extended chunk, echoing the request's offset; success carries no payload.
    assert (chunk.type, chunk.error, chunk.offset, chunk.cookie) == (REPLY_TYPE_NONE, 0, offset, 1)

    c.request(CMD_READ, offset, len(data), 2, flags=CMD_FLAG_DF)
    chunk = single(c)
    assert (chunk.type, chunk.offset) == (REPLY_TYPE_OFFSET_DATA, offset)
    assert struct.unpack(">Q", chunk.payload[:8])[0] == offset
    assert chunk.payload[8:] == data

    # A large read over mostly unallocated space comes back as data and hole chunks.
    c.request(CMD_READ, offset - (1 << 20), 4 << 20, 3)
    reply = c.read_reply()
    kinds = [chunk.type for chunk in reply.chunks]
    assert REPLY_TYPE_OFFSET_HOLE in kinds and REPLY_TYPE_OFFSET_DATA in kinds
    assert all(chunk.offset == offset - (1 << 20) for chunk in reply.chunks)
    c.close()

    if nbd is not None:  # a compact client sees the same bytes
        h = nbd.NBD()
        h.set_export_name("disk")
        h.connect_unix(server)
        assert h.pread(len(data), offset) == data
        h.shutdown()


def test_errors_come_as_extended_chunks(server: str) -> None:
    c = extended_client(server)
    # A write must say that its length is a payload length.
    c.request(CMD_WRITE, 0, 4096, 1)
    chunk = single(c)
    assert (chunk.type, chunk.error, chunk.cookie) == (REPLY_TYPE_ERROR, EINVAL, 1)
    c.request(CMD_READ, SIZE - 512, 1024, 2)
    assert single(c).error == EINVAL
    # A payload on a command that takes none is consumed, then refused.
    c.request(CMD_FLUSH, 0, 16, 3, b"\0" * 16, flags=CMD_FLAG_PAYLOAD_LEN)
    assert single(c).error == EINVAL
    c.request(CMD_READ, 0, 512, 4)
    assert single(c).type == REPLY_TYPE_OFFSET_DATA
    c.close()

    ro = extended_client(server, b"ro")
    ro.request(CMD_WRITE, 0, 512, 5, b"\1" * 512, flags=CMD_FLAG_PAYLOAD_LEN)
    assert single(ro).error == EPERM
    ro.request(CMD_TRIM, 0, 1 << 20, 6)
    assert single(ro).error == EPERM
    ro.close()


def test_oversized_payload_drops_only_that_client(server: str) -> None:
    other = extended_client(server)
    bad = extended_client(server)
    bad.request(CMD_WRITE, 0, (32 << 20) + 1, 1, flags=CMD_FLAG_PAYLOAD_LEN)
    assert bad.at_eof()
    other.request(CMD_READ, 0, 512, 2)
    assert single(other).type == REPLY_TYPE_OFFSET_DATA


def test_64_bit_effect_lengths_and_block_status(server: str) -> None:
    c = extended_client(server)
    data = b"\x5a" * 65536
    c.request(CMD_WRITE, 0, len(data), 1, data, flags=CMD_FLAG_PAYLOAD_LEN)
    assert single(c).error == 0
    c.request(CMD_WRITE, SIZE - 65536, len(data), 2, data, flags=CMD_FLAG_PAYLOAD_LEN)
    assert single(c).error == 0

    # One request covering more than 4 GiB: a compact header cannot express it.
    c.request(CMD_BLOCK_STATUS, 0, SIZE, 3)
    chunk = single(c)
    assert chunk.type == REPLY_TYPE_BLOCK_STATUS_EXT
    context, count = struct.unpack(">II", chunk.payload[:8])
    assert context == 1 and count == (len(chunk.payload) - 8) // 16
    extents = [struct.unpack(">QQ", chunk.payload[8 + 16 * i:24 + 16 * i]) for i in range(count)]
    assert extents[0] == (65536, 0)
    assert extents[1] == (SIZE - 2 * 65536, STATE_HOLE | STATE_ZERO)
    assert extents[1][0] > 1 << 32
    assert extents[2] == (65536, 0)

    # Zeroing more than 4 GiB in one request, then REQ_ONE.
    c.request(CMD_WRITE_ZEROES, 0, SIZE, 4)
    assert single(c).error == 0
    c.request(CMD_BLOCK_STATUS, 0, SIZE, 5, flags=CMD_FLAG_REQ_ONE)
    chunk = single(c)
    assert struct.unpack(">IIQQ", chunk.payload) == (1, 1, SIZE, STATE_HOLE | STATE_ZERO)
    c.close()


def test_block_status_payload_form(server: str) -> None:
    c = extended_client(server)
    payload = struct.pack(">QI", 1 << 20, 1)
    c.request(CMD_BLOCK_STATUS, 0, len(payload), 1, payload, flags=CMD_FLAG_PAYLOAD_LEN)
    chunk = single(c)
    assert chunk.type == REPLY_TYPE_BLOCK_STATUS_EXT
    assert struct.unpack(">IIQQ", chunk.payload) == (1, 1, 1 << 20, STATE_HOLE | STATE_ZERO)
    # An id that was never selected, or a malformed payload: consumed and refused.
    for bad in (struct.pack(">QI", 1 << 20, 7), struct.pack(">QII", 1 << 20, 1, 1), b"\0" * 6):
        c.request(CMD_BLOCK_STATUS, 0, len(bad), 2, bad, flags=CMD_FLAG_PAYLOAD_LEN)
        assert single(c).error == EINVAL
    c.request(CMD_FLUSH, 0, 0, 3)
    assert single(c).type == REPLY_TYPE_NONE
    c.close()


def test_reply_magic_is_extended_for_every_command(server: str) -> None:
    c = extended_client(server)
    c.request(CMD_FLUSH, 0, 0, 9)
    raw = c.recv_exact(32)
    magic, flags, rtype, cookie, offset, length = struct.unpack(">IHHQQQ", raw)
    assert (magic, flags, rtype, cookie, offset, length) == (
        EXTENDED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 9, 0, 0)
    c.close()
