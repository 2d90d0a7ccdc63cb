"""A hand-driven NBD client for protocol tests.

It speaks the wire protocol byte by byte, so a test can do what well-behaved clients never do
(wrong magic, truncated options, oversized requests, vanishing mid-reply) and can use protocol
features that the installed clients do not have yet (extended headers: libnbd only has them from
1.18 and QEMU from 8.2). Constants are the NBD protocol's (NetworkBlockDevice/nbd doc/proto.md).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
OPT_EXTENDED_HEADERS = 11

REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = 0x80000001, 0x80000002, 0x80000003
REP_ERR_UNKNOWN, REP_ERR_TOO_BIG, REP_ERR_EXT_HEADER_REQD = 0x80000006, 0x80000009, 0x8000000A

INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

FLAG_HAS_FLAGS, FLAG_READ_ONLY, FLAG_SEND_DF = 1 << 0, 1 << 1, 1 << 7
FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_DF, CMD_FLAG_REQ_ONE = 1, 2, 4, 8
CMD_FLAG_FAST_ZERO, CMD_FLAG_PAYLOAD_LEN = 16, 32

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE = 0, 1, 2
REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_BLOCK_STATUS_EXT = 5, 6
REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET = 0x8001, 0x8002

STATE_HOLE, STATE_ZERO = 1, 2
EPERM, EIO, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 22, 28, 75, 95, 108


@dataclass
class Chunk:
    """One structured or extended reply chunk (a simple reply is a chunk of type None)."""

    cookie: int
    error: int = 0
    flags: int = REPLY_FLAG_DONE
    type: int | None = None
    offset: int | None = None  # the request offset echoed by an extended header
    payload: bytes = b""

    @property
    def done(self) -> bool:
        return bool(self.flags & REPLY_FLAG_DONE)


@dataclass
class Reply:
    """All chunks of one reply, with the error of its error chunk (if any)."""

    cookie: int
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def error(self) -> int:
        for chunk in self.chunks:
            if chunk.error:
                return chunk.error
        return 0


class WireClient:
    """One NBD connection over a Unix socket, driven by hand."""

    def __init__(self, path: str, timeout: float = 10) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.mode = "simple"  # "structured" or "extended" once negotiated
        self.export_size = 0
        self.transmission_flags = 0

    # ---- bytes

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.s.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def recv_exact(self, n: int) -> bytes:
        data = self.recv(n)
        if len(data) != n:
            raise ConnectionError(f"server closed the connection after {len(data)} of {n} bytes")
        return data

    def at_eof(self) -> bool:
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.s.close()

    # ---- handshake

    def greet(self, client_flags: int = 3) -> None:
        magic, opt, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt, flags) == (NBDMAGIC, IHAVEOPT, 3), (magic, opt, flags)
        self.s.sendall(struct.pack(">I", client_flags))

    def option(self, option: int, data: bytes = b"", declared: int | None = None) -> None:
        length = len(data) if declared is None else declared
        self.s.sendall(struct.pack(">QII", IHAVEOPT, option, length) + data)

    def reply(self) -> tuple[int, int, bytes]:
        """One option reply: (option, reply type, payload)."""
        magic, option, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC, hex(magic)
        return option, rtype, self.recv_exact(length)

    def simple_option(self, option: int) -> int:
        """Sends an option without payload and returns the reply type (ACK or an error)."""
        self.option(option)
        _, rtype, _ = self.reply()
        if rtype == REP_ACK:
            if option == OPT_STRUCTURED_REPLY:
                self.mode = "structured"
            elif option == OPT_EXTENDED_HEADERS:
                self.mode = "extended"
        return rtype

    def set_meta_context(self, name: bytes, *queries: bytes) -> list[tuple[int, bytes]]:
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
        for query in queries:
            data += struct.pack(">I", len(query)) + query
        self.option(OPT_SET_META_CONTEXT, data)
        contexts = []
        while True:
            _, rtype, payload = self.reply()
            if rtype == REP_ACK:
                return contexts
            assert rtype == REP_META_CONTEXT, hex(rtype)
            contexts.append((struct.unpack(">I", payload[:4])[0], payload[4:]))

    def go(self, name: bytes = b"n0", infos: tuple[int, ...] = ()) -> dict[int, bytes]:
        """NBD_OPT_GO; returns the NBD_REP_INFO payloads by type."""
        self.option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
                    + b"".join(struct.pack(">H", info) for info in infos))
        received = {}
        while True:
            _, rtype, payload = self.reply()
            if rtype == REP_ACK:
                self.export_size, self.transmission_flags = struct.unpack(
                    ">QH", received[INFO_EXPORT][2:12])
                return received
            assert rtype == REP_INFO, hex(rtype)
            received[struct.unpack(">H", payload[:2])[0]] = payload

    # ---- transmission

    def request(self, cmd: int, offset: int, length: int, cookie: int, payload: bytes = b"",
                flags: int = 0) -> None:
        """Sends a request in the negotiated header form (the payload is sent as given)."""
        if self.mode == "extended":
            header = struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        else:
            header = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        self.s.sendall(header + payload)

    def simple_reply(self) -> tuple[int, int]:
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        return error, cookie

    def chunk(self, read_length: int = 0) -> Chunk:
        """The next reply message; `read_length` is the payload a simple read reply carries."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            return Chunk(cookie, error, payload=b"" if error else self.recv_exact(read_length))
        if magic == STRUCTURED_REPLY_MAGIC:
            flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            offset = None
        elif magic == EXTENDED_REPLY_MAGIC:
            flags, rtype, cookie, offset, length = struct.unpack(">HHQQQ", self.recv_exact(28))
        else:
            raise AssertionError(f"unexpected reply magic {magic:#x}")
        payload = self.recv_exact(length)
        error = struct.unpack(">I", payload[:4])[0] if rtype & 0x8000 else 0
        return Chunk(cookie, error, flags, rtype, offset, payload)

    def read_reply(self, read_length: int = 0) -> Reply:
        """Every chunk of the next reply (replies are not interleaved in these tests)."""
        first = self.chunk(read_length)
        reply = Reply(first.cookie, [first])
        while not reply.chunks[-1].done:
            reply.chunks.append(self.chunk(read_length))
            assert reply.chunks[-1].cookie == reply.cookie
        return reply
