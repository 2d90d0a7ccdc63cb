"""Reads of files in memory that the NBD export hands to the kernel (sendfile) instead of copying
through a buffer: libnbd, qemu-img and fio must see exactly the bytes of the image, through raw
windows, past the end of a short file, beside holes, through qcow2's cluster map, and the
server must carry on when a client goes away in the middle of a transfer.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import json
import os
import random
import select
import shutil
import struct
import subprocess
import termios
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from blockd.testing.clients import import_core, import_libnbd
from blockd.testing.nbd_wire import (
    CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_PAYLOAD_LEN, CMD_READ, CMD_WRITE, CMD_WRITE_ZEROES,
    EXTENDED_REQUEST_MAGIC, OPT_EXTENDED_HEADERS, REP_ACK, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
    REQUEST_MAGIC, WireClient,
)

# The engine session and socket fixtures of the main NBD export tests.
from test_nbd_export import Session, connect, session, sock, unix_addr  # noqa: F401

core = import_core()
nbd = import_libnbd()

pytestmark = [
    pytest.mark.skipif(nbd is None, reason="python3-libnbd (module nbd) is not installed"),
    pytest.mark.skipif(not os.path.isdir("/dev/shm") or
                       subprocess.run(["stat", "-f", "-c", "%T", "/dev/shm"], capture_output=True,
                                      text=True).stdout.strip() != "tmpfs",
                       reason="/dev/shm is not a tmpfs here"),
]

MiB = 1 << 20


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Path]:
    directory = Path("/dev/shm") / f"blockd-mapped-{os.getpid()}-{tmp_path.name}"
    directory.mkdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def pattern(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def serve(session: Session, sock: str, node: str) -> None:
    session.qmp("nbd-server-start", addr=unix_addr(sock))
    session.qmp("block-export-add", type="nbd", id="exp0", node_name=node, name="disk",
                writable=True)


def reads(size: int) -> list[tuple[int, int]]:
    """Offsets and lengths around the 32 KiB threshold, unaligned ones, and up to 1 MiB."""
    rng = random.Random(7)
    chosen = [(0, MiB), (size - MiB, MiB), (12345, 65536 + 7), (size - 40000, 40000),
              (4096, 32768), (1, 32767), (3 * MiB + 17, 2 * MiB)]
    for _ in range(20):
        length = rng.choice([4096, 32768, 65536, 200000, MiB])
        chosen.append((rng.randrange(0, size - length), length))
    return chosen


def read_df(h: Any, length: int, start: int) -> bytes:
    """A structured read with NBD_CMD_FLAG_DF: the server answers with one data chunk."""
    return h.pread_structured(length, start, lambda *chunk: 0, nbd.CMD_FLAG_DF)


def raw_window(session: Session, shm: Path, sock: str) -> tuple[bytes, int, int]:
    """A patterned file in memory exported through a raw node with an offset and a size."""
    image = shm / "disk.raw"
    data = pattern(8 * MiB + 3000)
    image.write_bytes(data)
    offset = 4096 + 512
    size = 6 * MiB
    session.qmp("blockdev-add", driver="file", node_name="file0", filename=str(image))
    session.qmp("blockdev-add", driver="raw", node_name="raw0", file="file0", offset=offset,
                size=size)
    serve(session, sock, "raw0")
    return data, offset, size


@pytest.mark.parametrize("structured", [True, False])
def test_reads_match_the_file_through_a_raw_window(session: Session, sock: str, shm: Path,
                                                   structured: bool) -> None:
    data, offset, size = raw_window(session, shm, sock)
    h = connect(sock, structured=structured, meta=structured)
    assert h.get_size() == size
    for start, length in reads(size):
        assert h.pread(length, start) == data[offset + start:offset + start + length], (start, length)
        if structured:
            assert read_df(h, length, start) == data[offset + start:offset + start + length]
    # Writes through the export are what later reads return.
    h.pwrite(b"w" * 100000, 50000)
    assert h.pread(200000, 0) == data[offset:offset + 50000] + b"w" * 100000 + \
        data[offset + 150000:offset + 200000]
    h.shutdown()


def test_pipelined_extended_reads_arrive_whole_and_in_one_piece(session: Session, sock: str,
                                                                 shm: Path) -> None:
    """Many large reads sent at once: each reply is one data chunk whose header and bytes are not
    interleaved with another reply's (a raw wire client reads them strictly one after another)."""
    data, offset, size = raw_window(session, shm, sock)
    c = WireClient(sock)
    c.greet()
    assert c.simple_option(OPT_EXTENDED_HEADERS) == REP_ACK
    c.go(b"disk")
    wanted = {}
    for cookie, (start, length) in enumerate(reads(size), start=1):
        c.request(CMD_READ, start, length, cookie, flags=CMD_FLAG_DF if cookie % 2 else 0)
        wanted[cookie] = (start, length)
    while wanted:
        reply = c.read_reply()
        start, length = wanted.pop(reply.cookie)
        assert reply.error == 0
        assert [chunk.type for chunk in reply.chunks] == [REPLY_TYPE_OFFSET_DATA]
        payload = reply.chunks[0].payload
        assert struct.unpack(">Q", payload[:8])[0] == start
        assert payload[8:] == data[offset + start:offset + start + length], (start, length)
    c.close()


@pytest.mark.parametrize("structured", [True, False])
def test_short_file_reads_zeroes_past_its_end(session: Session, sock: str, shm: Path,
                                              structured: bool) -> None:
    """The node is rounded up to whole sectors, and the file may shrink under the server: the
    kernel transfer stops at the end of the file and the server sends zeroes for the rest."""
    image = shm / "short.raw"
    data = pattern(2 * MiB + 100, seed=2)
    image.write_bytes(data)
    session.qmp("blockdev-add", driver="file", node_name="file0", filename=str(image))
    serve(session, sock, "file0")
    h = connect(sock, structured=structured, meta=False)
    size = h.get_size()
    assert size == 2 * MiB + 512
    # With DF there is one data chunk (no hole query first), as with simple replies.
    read = (lambda length, start: read_df(h, length, start)) if structured else h.pread
    assert read(MiB, size - MiB) == data[size - MiB:] + bytes(412)
    os.truncate(image, MiB + 4096)
    assert read(MiB, MiB - 8192) == data[MiB - 8192:MiB + 4096] + bytes(MiB - 12288)
    assert read(65536, MiB + 65536) == bytes(65536)
    h.shutdown()


@pytest.mark.parametrize("structured", [True, False])
def test_small_reads_from_the_mapping_follow_writes_and_survive_a_shrunk_file(
        session: Session, sock: str, shm: Path, structured: bool) -> None:
    """Reads below the sendfile threshold go out of the node's mapping of the file: they see
    every write answered before them (through the export or into the file directly), and a file
    shrunk by another process under a small read ends that connection (the kernel refuses the
    transfer), not the server."""
    image = shm / "small.raw"
    data = bytearray(pattern(4 * MiB, seed=8))
    image.write_bytes(data)
    session.qmp("blockdev-add", driver="file", node_name="file0", filename=str(image))
    session.qmp("blockdev-add", driver="raw", node_name="raw0", file="file0")
    serve(session, sock, "raw0")
    h = connect(sock, structured=structured, meta=False)
    rng = random.Random(9)
    for _ in range(200):
        length = rng.choice([512, 4096, 4097, 8192, 32767])
        start = rng.randrange(0, 4 * MiB - length)
        if rng.random() < 0.3:
            chunk = rng.randbytes(length)
            h.pwrite(chunk, start)
            data[start:start + length] = chunk
        assert h.pread(length, start) == data[start:start + length], (start, length)
    with open(image, "r+b") as f:  # another writer of the file
        os.pwrite(f.fileno(), b"x" * 4096, MiB)
    assert h.pread(4096, MiB) == b"x" * 4096
    os.truncate(image, MiB)
    with pytest.raises(nbd.Error):
        h.pread(4096, 2 * MiB)
    h = connect(sock, structured=structured, meta=False)
    assert h.pread(4096, MiB - 4096) == bytes(data[MiB - 4096:MiB])
    h.shutdown()


def test_holes_stay_on_the_buffered_path_and_qcow2_reads_match(session: Session, sock: str,
                                                                shm: Path) -> None:
    image = shm / "sparse.raw"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(pattern(MiB, seed=3))
        f.seek(5 * MiB + 4096)
        f.write(pattern(65536, seed=4))
    expected = image.read_bytes()
    session.qmp("blockdev-add", driver="file", node_name="file0", filename=str(image))
    serve(session, sock, "file0")
    h = connect(sock)
    chunks: list[tuple[int, int, int]] = []

    def chunk(subbuf: bytes, offset: int, status: int, err: Any) -> int:
        chunks.append((status, offset, len(subbuf)))
        return 0

    assert h.pread_structured(4 * MiB, 0, chunk) == expected[:4 * MiB]
    # The holes around the data still come as hole chunks, the data as one data chunk.
    assert (nbd.READ_HOLE, 0, MiB) in chunks and (nbd.READ_DATA, MiB, MiB) in chunks
    for start, length in reads(8 * MiB):
        assert h.pread(length, start) == expected[start:start + length]
    h.shutdown()
    session.qmp("block-export-del", id="exp0")
    session.events("BLOCK_EXPORT_DELETED", timeout=0.5)
    session.qmp("nbd-server-stop")

    # qcow2 on a file in memory: runs of clusters stored one after another are handed to the
    # kernel, the rest (holes, ranges the image scatters) is read through the driver.
    qcow2 = shm / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(qcow2)],
                   check=True, capture_output=True)
    session.qmp("blockdev-add", driver="file", node_name="qfile", filename=str(qcow2))
    session.qmp("blockdev-add", driver="qcow2", node_name="q0", file="qfile")
    serve(session, sock, "q0")
    h = connect(sock)
    for start, length in reads(8 * MiB):
        assert h.pread(length, start) == expected[start:start + length]
    h.shutdown()


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing (qemu-utils)")
@pytest.mark.skipif(shutil.which("fio") is None, reason="fio missing (Debian package fio)")
def test_qemu_img_and_fio_read_back_what_is_in_the_file(session: Session, sock: str,
                                                        shm: Path) -> None:
    image = shm / "disk.raw"
    image.write_bytes(pattern(32 * MiB, seed=5))
    session.qmp("blockdev-add", driver="file", node_name="file0", filename=str(image))
    serve(session, sock, "file0")
    uri = f"nbd+unix:///disk?socket={sock}"
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri],
                             capture_output=True, text=True, timeout=60)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    # fio writes checksummed 1 MiB blocks, then reads them back at queue depth 8 and checks them.
    job = ["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1M",
           "--size=32m", "--iodepth=8", "--verify=crc32c", "--verify_fatal=1",
           "--verify_state_save=0", "--output-format=json"]
    for extra in ([], ["--verify_only", "--rw=read"]):
        run = subprocess.run(job + extra, capture_output=True, text=True, timeout=120, cwd=shm)
        assert run.returncode == 0, run.stdout + run.stderr
        result = json.loads(run.stdout[run.stdout.index("{"):])["jobs"][0]
        assert result["error"] == 0
        assert result["read"]["io_bytes"] == 32 * MiB


def test_client_leaving_in_the_middle_of_transfers(session: Session, sock: str, shm: Path) -> None:
    """A client that asks for many large reads and hangs up without reading the replies: the
    server drops it and serves the next client."""
    image = shm / "disk.raw"
    data = pattern(16 * MiB, seed=6)
    image.write_bytes(data)
    session.qmp("blockdev-add", driver="file", node_name="file0", filename=str(image))
    serve(session, sock, "file0")
    for _ in range(3):
        h = connect(sock, meta=False)
        buffers = [nbd.Buffer(MiB) for _ in range(16)]
        for i, buffer in enumerate(buffers):
            h.aio_pread(buffer, i * MiB)
        h.poll(0)
        del h  # closes the socket with replies unread
    h = connect(sock)
    assert hashlib.sha256(h.pread(16 * MiB, 0)).digest() == hashlib.sha256(data).digest()
    h.shutdown()
    # Deleting the export with a client connected ends it cleanly too.
    h = connect(sock)
    buffer = nbd.Buffer(MiB)
    h.aio_pread(buffer, 0)
    session.qmp("block-export-del", id="exp0", mode="hard")
    assert session.events("BLOCK_EXPORT_DELETED", timeout=1) == [{"id": "exp0"}]
    session.qmp("blockdev-del", node_name="file0")


# ---- Writes spliced from the socket into the file.

@pytest.mark.parametrize("structured", [True, False])
def test_large_writes_land_in_the_file_through_a_raw_window(session: Session, sock: str, shm: Path,
                                                            structured: bool) -> None:
    data, offset, size = raw_window(session, shm, sock)
    model = bytearray(data)
    h = connect(sock, structured=structured, meta=False)
    rng = random.Random(11)
    for i in range(24):
        length = rng.choice([40000, 128 << 10, 200001, MiB, 4 * MiB])
        start = rng.randrange(0, size - length)
        payload = pattern(length, seed=100 + i)
        # FUA writes take the buffered path (the file alone cannot make them durable).
        h.pwrite(payload, start, nbd.CMD_FLAG_FUA if i % 5 == 0 else 0)
        model[offset + start:offset + start + length] = payload
    # Several at once, so that payloads follow each other in the socket.
    buffers = []
    for i in range(8):
        payload = pattern(512 * 1024 + 4096 * i, seed=200 + i)
        start = i * 640 * 1024 + 777
        buffers.append(nbd.Buffer.from_bytearray(bytearray(payload)))
        h.aio_pwrite(buffers[-1], start)
        model[offset + start:offset + start + len(payload)] = payload
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for start, length in reads(size):
        assert h.pread(length, start) == bytes(model[offset + start:offset + start + length])
    h.shutdown()
    assert (shm / "disk.raw").read_bytes() == bytes(model)


def small_requests(size: int, seed: int) -> list[tuple[int, int, bool]]:
    """Disjoint (offset, length, fua) ranges of writes around the 32 KiB threshold, most of them
    small enough for the reader to complete them itself."""
    rng = random.Random(seed)
    chosen = []
    start = 0
    while len(chosen) < 300:
        length = rng.choice([1, 512, 4096, 4096, 4096, 4097, 8192, 32767, 32768, 40000])
        start += rng.randrange(0, 3) * 4096 + rng.choice([0, 0, 1, 511])
        if start + length > size:
            break
        chosen.append((start, length, rng.random() < 0.1))
        start += length
    return chosen


@pytest.mark.parametrize("structured", [True, False])
def test_pipelined_small_writes_and_reads_land_in_the_file(session: Session, sock: str, shm: Path,
                                                           structured: bool) -> None:
    """Hundreds of small writes in flight at once (the reader writes most of them into the file
    from its receive buffer and answers them without a task, FUA ones take the usual path), then
    as many reads: every reply is right, and the file holds exactly what was written."""
    data, offset, size = raw_window(session, shm, sock)
    model = bytearray(data)
    h = connect(sock, structured=structured, meta=False)
    requests = small_requests(size, seed=11)
    buffers = []
    for i, (start, length, fua) in enumerate(requests):
        chunk = pattern(length, seed=1000 + i)
        buffers.append(nbd.Buffer.from_bytearray(bytearray(chunk)))
        h.aio_pwrite(buffers[-1], start, flags=nbd.CMD_FLAG_FUA if fua else 0)
        model[offset + start:offset + start + length] = chunk
    while h.aio_in_flight() > 0:
        h.poll(-1)
    reads_in_flight = []
    for start, length, _ in requests:
        buffer = nbd.Buffer(length)
        reads_in_flight.append((start, length, buffer, h.aio_pread(buffer, start)))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for start, length, buffer, cookie in reads_in_flight:
        assert h.aio_command_completed(cookie)
        wanted = model[offset + start:offset + start + length]
        assert buffer.to_bytearray() == wanted, (start, length)
    h.shutdown()
    session.qmp("block-export-del", id="exp0")
    assert (shm / "disk.raw").read_bytes() == bytes(model)


def test_pipelined_small_extended_writes_and_reads(session: Session, sock: str, shm: Path) -> None:
    """The same with extended headers (32-byte requests and reply chunks, offset echoed), and a
    small write past the end of the file, which grows it to the node's sector-rounded size."""
    data, offset, size = raw_window(session, shm, sock)
    model = bytearray(data)
    c = WireClient(sock)
    c.greet()
    assert c.simple_option(OPT_EXTENDED_HEADERS) == REP_ACK
    c.go(b"disk")
    requests = small_requests(size, seed=12)
    for cookie, (start, length, fua) in enumerate(requests, start=1):
        chunk = pattern(length, seed=2000 + cookie)
        c.request(CMD_WRITE, start, length, cookie, chunk,
                  flags=CMD_FLAG_PAYLOAD_LEN | (CMD_FLAG_FUA if fua else 0))
        model[offset + start:offset + start + length] = chunk
    pending = set(range(1, len(requests) + 1))
    while pending:
        reply = c.read_reply()
        pending.remove(reply.cookie)
        assert reply.error == 0
        assert [(chunk.type, chunk.offset) for chunk in reply.chunks] == \
            [(REPLY_TYPE_NONE, requests[reply.cookie - 1][0])]
    for cookie, (start, length, _) in enumerate(requests, start=1):
        c.request(CMD_READ, start, length, cookie)
    pending = set(range(1, len(requests) + 1))
    while pending:
        reply = c.read_reply()
        pending.remove(reply.cookie)
        start, length, _ = requests[reply.cookie - 1]
        assert [chunk.type for chunk in reply.chunks] == [REPLY_TYPE_OFFSET_DATA]
        payload = reply.chunks[0].payload
        assert struct.unpack(">Q", payload[:8])[0] == start
        assert payload[8:] == model[offset + start:offset + start + length], (start, length)
    c.close()

    # A short file: the node ends on the next sector boundary, 412 bytes past the file.
    image = shm / "short.raw"
    image.write_bytes(pattern(MiB + 100, seed=3))
    session.qmp("blockdev-add", driver="file", node_name="short", filename=str(image))
    session.qmp("block-export-add", type="nbd", id="exp1", node_name="short", name="short",
                writable=True)
    c = WireClient(sock)
    c.greet()
    assert c.simple_option(OPT_EXTENDED_HEADERS) == REP_ACK
    c.go(b"short")
    c.request(CMD_WRITE, MiB + 512 - 4096, 4096, 7, b"t" * 4096, flags=CMD_FLAG_PAYLOAD_LEN)
    assert c.read_reply().error == 0
    c.close()
    assert image.read_bytes()[-4097:] == pattern(MiB + 100, seed=3)[MiB - 3585:MiB - 3584] + \
        b"t" * 4096


def test_small_writes_into_a_file_shrunk_behind_the_mapping(session: Session, sock: str,
                                                            shm: Path) -> None:
    """Small writes go into a writable mapping of the file. When another process shrinks the file,
    copying into the pages past its new end raises SIGBUS: the server survives, writes that batch
    with pwrite instead (which grows the file again, as any write past the end does), and every
    write is answered and lands."""
    image = shm / "shrinking.raw"
    size = 4 * MiB
    model = bytearray(pattern(size, seed=21))
    image.write_bytes(model)
    session.qmp("blockdev-add", driver="file", node_name="file0", filename=str(image))
    serve(session, sock, "file0")
    c = WireClient(sock)
    c.greet()
    assert c.simple_option(OPT_EXTENDED_HEADERS) == REP_ACK
    c.go(b"disk")
    c.request(CMD_WRITE, 4096, 4096, 1, b"m" * 4096, flags=CMD_FLAG_PAYLOAD_LEN)
    assert c.read_reply().error == 0  # the mapping now covers the whole file
    model[4096:8192] = b"m" * 4096
    os.truncate(image, MiB)
    model[MiB:] = bytes(size - MiB)
    # One burst: writes before and past the new end arrive in the same receive.
    burst = b""
    writes = [(8192, 4096), (2 * MiB, 4096), (MiB - 100, 4096), (3 * MiB + 1, 3000), (16384, 512)]
    for cookie, (start, length) in enumerate(writes, start=10):
        chunk = pattern(length, seed=cookie)
        model[start:start + length] = chunk
        burst += struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, CMD_FLAG_PAYLOAD_LEN, CMD_WRITE,
                             cookie, start, length) + chunk
    c.s.sendall(burst)
    for _ in writes:
        assert c.read_reply().error == 0
    # The connection carries on, and reads see the writes.
    c.request(CMD_READ, 2 * MiB, 4096, 20)
    assert c.read_reply().chunks[0].payload[8:] == model[2 * MiB:2 * MiB + 4096]
    c.close()
    data = image.read_bytes()
    assert len(data) == 3 * MiB + 3001
    assert data == bytes(model[:3 * MiB + 3001])


def unsent_bytes(client: WireClient) -> int:
    """What the client sent that the server has not received yet (SIOCOUTQ), in buffer units."""
    count = array.array("i", [0])
    fcntl.ioctl(client.s.fileno(), termios.TIOCOUTQ, count)
    return count[0]


def test_large_writes_into_a_file_shrunk_behind_the_mapping(session: Session, sock: str,
                                                            shm: Path) -> None:
    """Large write payloads are received straight into the writable mapping of the file. When
    another process shrinks the file while a payload comes in, or before, the kernel refuses to
    copy into the pages past the new end: the server survives, finishes the payload through a
    buffer and writes it like any other write (growing the file again), and every byte lands."""
    image = shm / "shrinking-large.raw"
    model = bytearray(pattern(8 * MiB, seed=51))
    image.write_bytes(model)
    session.qmp("blockdev-add", driver="file", node_name="file0", filename=str(image))
    serve(session, sock, "file0")
    c = WireClient(sock)
    c.greet()
    c.go(b"disk")
    first = pattern(MiB, seed=52)
    c.request(CMD_WRITE, 0, MiB, 1, first)
    assert c.simple_reply() == (0, 1)  # the mapping now covers the whole file
    model[:MiB] = first
    # The first half of the payload is in the file's pages when the file shrinks under the rest.
    payload = pattern(2 * MiB, seed=53)
    c.request(CMD_WRITE, 3 * MiB, len(payload), 2, payload[:MiB])
    deadline = time.monotonic() + 30
    while unsent_bytes(c) > 0 and time.monotonic() < deadline:
        select.select([], [], [], 0.001)
    os.truncate(image, 4 * MiB)
    c.s.sendall(payload[MiB:])
    assert c.simple_reply() == (0, 2)
    del model[4 * MiB:]
    model[3 * MiB:] = payload
    # Pages past the end before the payload comes (the file is 5 MiB, the node still 8 MiB).
    last = pattern(MiB, seed=54)
    c.request(CMD_WRITE, 6 * MiB, MiB, 3, last)
    assert c.simple_reply() == (0, 3)
    model += bytes(MiB) + last
    # The same for a payload that came whole with its header.
    whole = pattern(40000, seed=55)
    c.request(CMD_WRITE, 7 * MiB + 4096, len(whole), 5, whole)
    assert c.simple_reply() == (0, 5)
    model += bytes(4096) + whole
    # The connection carries on, and reads see the writes.
    c.request(CMD_READ, 3 * MiB + 4096, 8192, 4)
    assert c.chunk(8192).payload == model[3 * MiB + 4096:3 * MiB + 12288]
    c.close()
    assert image.read_bytes() == bytes(model)


def test_a_burst_of_overlapping_writes_lands_in_the_order_sent(session: Session, sock: str,
                                                               shm: Path) -> None:
    """Small writes copied into the mapping at the end of a receive still reach the file before
    the requests sent after them in the same receive (a FUA write, write zeroes, a large write)."""
    image = shm / "ordered.raw"
    image.write_bytes(pattern(2 * MiB, seed=31))
    session.qmp("blockdev-add", driver="file", node_name="file0", filename=str(image))
    serve(session, sock, "file0")
    c = WireClient(sock)
    c.greet()
    c.go(b"disk")
    steps = [(CMD_WRITE, 0, b"a" * 4096, 0), (CMD_WRITE, 0, b"b" * 4096, CMD_FLAG_FUA),
             (CMD_WRITE, 8192, b"c" * 4096, 0), (CMD_WRITE_ZEROES, 8192, 4096, 0),
             (CMD_WRITE, 65536, b"d" * 512, 0), (CMD_WRITE, 65536, b"e" * 65536, 0),
             (CMD_WRITE, 0, b"f" * 100, 0)]
    burst = b""
    for cookie, (cmd, start, payload, flags) in enumerate(steps, start=1):
        length = payload if isinstance(payload, int) else len(payload)
        burst += struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, start, length)
        burst += b"" if isinstance(payload, int) else payload
    c.s.sendall(burst)
    for _ in steps:
        assert c.read_reply().error == 0
    c.close()
    data = image.read_bytes()
    assert data[:4096] == b"f" * 100 + b"b" * 3996
    assert data[8192:12288] == bytes(4096)
    assert data[65536:131072] == b"e" * 65536


def test_small_write_payload_split_across_receives(session: Session, sock: str,
                                                  shm: Path) -> None:
    """Small writes after which the client stops mid-payload: their start is kept in the receive
    buffer and the rest received after it, and the writes before them are answered meanwhile."""
    image = shm / "split.raw"
    image.write_bytes(pattern(MiB, seed=41))
    model = bytearray(image.read_bytes())
    session.qmp("blockdev-add", driver="file", node_name="file0", filename=str(image))
    serve(session, sock, "file0")
    c = WireClient(sock)
    c.greet()
    c.go(b"disk")
    for cookie, start in enumerate((4096, 100000, 700001), start=1):
        before, split = pattern(4096, seed=cookie), pattern(4096, seed=10 + cookie)
        c.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, cookie, start, 4096) +
                    before +
                    struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 10 + cookie, start + 8192,
                                4096) + split[:1000 * cookie])
        assert c.simple_reply() == (0, cookie)  # the whole write before is answered
        assert not select.select([c.s], [], [], 0.05)[0]  # the split one waits for its rest
        c.s.sendall(split[1000 * cookie:])
        assert c.simple_reply() == (0, 10 + cookie)
        model[start:start + 4096] = before
        model[start + 8192:start + 12288] = split
    c.close()
    assert image.read_bytes() == bytes(model)


def test_write_errors_of_the_file_reach_the_client(session: Session, sock: str) -> None:
    """A sealed memfd (tmpfs underneath) refuses writes: the client gets EPERM for large and small
    writes alike, the payload is consumed, and the connection carries on. Sealed before the
    server writes to it: once it has, its writable mapping of the file keeps the seal away."""
    if not hasattr(os, "memfd_create") or not hasattr(fcntl, "F_ADD_SEALS"):
        pytest.skip("no memfd sealing here")
    fd = os.memfd_create("blockd-sealed", os.MFD_ALLOW_SEALING)
    try:
        data = pattern(4 * MiB, seed=9)
        os.write(fd, b"a" * MiB + data[MiB:])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        session.qmp("blockdev-add", driver="file", node_name="file0",
                    filename=f"/proc/{os.getpid()}/fd/{fd}", locking="off")
        serve(session, sock, "file0")
        h = connect(sock, meta=False)
        for length in (4096, 200000, 2 * MiB):
            with pytest.raises(nbd.Error) as info:
                h.pwrite(b"b" * length, 65536)
            assert info.value.errno == "EPERM"
        assert h.pread(3 * MiB, 0) == b"a" * MiB + data[MiB:3 * MiB]
        h.shutdown()
    finally:
        os.close(fd)
