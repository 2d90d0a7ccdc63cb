"""A client that stops reading its replies, or stops in the middle of a write payload, must not
hold up the other clients of the node.

Large reads and writes of a qcow2 image in /dev/shm go between the socket and the image file
through a mapping that keeps the node's clusters in place (flush, snapshots and allocating writes
wait for it). A raw NBD client stalls with such transfers under way; a libnbd client's flush, an
allocating write and a QMP internal snapshot of the node must still finish within seconds. Then
the stalled client carries on, and its reads return the right data and its write lands whole.
"""

from __future__ import annotations

import array
import fcntl
import os
import termios
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from blockd.testing import nbd_wire
from blockd.testing.images import qemu_img, qemu_io

# A directory on /dev/shm per test (the mapped-read tests' fixture).
from test_nbd_mapped_reads import shm  # noqa: F401
from test_qcow2 import Export, add_qcow2, close_and_verify
# The same requirements as the other mapped qcow2 tests (qemu-img, libnbd, a tmpfs /dev/shm).
from test_qcow2_mapped import pytestmark  # noqa: F401

MiB = 1 << 20
SIZE = 32 * MiB
# How long the other client's commands may take; far beyond what they need, short of a hang.
DEADLINE = 15.0


def make_image(path: Path) -> bytearray:
    """16 MiB of data (one byte value per MiB) at the start of a 32 MiB image; the rest unallocated."""
    qemu_img("create", "-f", "qcow2", str(path), str(SIZE))
    reference = bytearray(SIZE)
    commands = []
    for step in range(16):
        commands += ["-c", f"write -P {0x20 + step} {step * MiB} {MiB}"]
        reference[step * MiB:(step + 1) * MiB] = bytes([0x20 + step]) * MiB
    qemu_io(*commands, str(path))
    return reference


def stalled_client(socket_path: Path) -> nbd_wire.WireClient:
    client = nbd_wire.WireClient(str(socket_path), timeout=30)
    client.greet()
    client.go(b"disk")
    return client


def others_finish(engine: Any, h: Any, reference: bytearray, unblock: Callable[[], None]) -> None:
    """The other client's flush, allocating write and a snapshot, in a thread: they must finish
    within DEADLINE. If they do not, `unblock` lets them finish before the test fails."""
    failures: list[BaseException] = []

    def work() -> None:
        try:
            h.flush()
            h.pwrite(b"\x5e" * MiB, 24 * MiB)  # unallocated so far: allocates clusters
            engine.qmp("blockdev-snapshot-internal-sync", {"device": "disk", "name": "s1"})
            h.flush()
        except BaseException as error:  # re-raised in the test's thread
            failures.append(error)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(DEADLINE)
    stuck = worker.is_alive()
    if stuck:
        unblock()
        worker.join(DEADLINE)
    assert not stuck, "a stalled client held up another client's flush, write or snapshot"
    if failures:
        raise failures[0]
    reference[24 * MiB:25 * MiB] = b"\x5e" * MiB


def queued_bytes(client: nbd_wire.WireClient) -> int:
    count = array.array("i", [0])
    fcntl.ioctl(client.s.fileno(), termios.FIONREAD, count)
    return count[0]


def finish(engine: Any, export: Export, image: Path, reference: bytearray, shm: Path) -> None:
    assert export.handle.pread(SIZE, 0) == reference
    close_and_verify(engine, export, image, reference, shm)


def serve(engine: Any, tmp_path: Path, image: Path) -> tuple[bytearray, Export, nbd_wire.WireClient]:
    """The image, exported writable, with a libnbd client and a raw client connected."""
    reference = make_image(image)
    add_qcow2(engine, image)
    export = Export(engine, tmp_path, writable=True)
    return reference, export, stalled_client(export.socket)


# Large reads go out with sendfile; small ones inside the sendmsg of their reply. Either way the
# replies add up to twice or more what the server's send buffer holds (4 MiB), in few enough
# requests (56 KiB at most) that the socket takes them all once the server stops reading.
STALLED_READS = {
    "large": [((step * 5) % 16 * MiB, MiB) for step in range(16)],
    "small": [((step * 7919) % 4096 * 4096, 4096) for step in range(2048)],
}


@pytest.mark.parametrize("size", sorted(STALLED_READS))
def test_client_not_reading_replies(engine: Any, tmp_path: Path, shm: Path, size: str) -> None:
    image = shm / "disk.qcow2"
    reference, export, stalled = serve(engine, tmp_path, image)
    reads = STALLED_READS[size]
    for cookie, (offset, length) in enumerate(reads):
        stalled.request(nbd_wire.CMD_READ, offset, length, cookie)
    # Wait until the replies fill the socket: the server is then stuck sending.
    deadline = time.monotonic() + DEADLINE
    while queued_bytes(stalled) < MiB and time.monotonic() < deadline:
        time.sleep(0.01)

    others_finish(engine, export.handle, reference, stalled.close)
    for cookie, (offset, length) in enumerate(reads):
        chunk = stalled.chunk(length)
        assert (chunk.cookie, chunk.error) == (cookie, 0)
        assert chunk.payload == reference[offset:offset + length], offset
    stalled.close()
    finish(engine, export, image, reference, shm)


def test_client_stalling_mid_write_payload(engine: Any, tmp_path: Path, shm: Path) -> None:
    image = shm / "disk.qcow2"
    reference, export, stalled = serve(engine, tmp_path, image)
    payload = os.urandom(MiB)
    offset = 3 * MiB  # clusters the image owns alone: the write goes straight into the file
    # A read first loads the L2 table, without which the node maps nothing.
    assert export.handle.pread(MiB, offset) == reference[offset:offset + MiB]
    stalled.request(nbd_wire.CMD_WRITE, offset, len(payload), 7, payload[:len(payload) // 2])
    # Nothing tells when the server has read the header and started on the payload; give it a
    # moment so that the other client's commands come while the write is under way.
    time.sleep(0.3)

    others_finish(engine, export.handle, reference, stalled.close)
    stalled.s.sendall(payload[len(payload) // 2:])
    assert stalled.simple_reply() == (0, 7)
    reference[offset:offset + len(payload)] = payload
    stalled.close()
    finish(engine, export, image, reference, shm)

