"""qcow2 clusters handed to the kernel over NBD (sendfile for reads, splice for writes).

A qcow2 image on a file in memory maps runs of normal clusters onto the image file, for reading
any of them, for writing only those it owns alone. libnbd's large reads and writes, pipelined and
mixed with snapshots, a revert and writes into clusters a snapshot shares, must give exactly the
data of a reference; afterwards ``qemu-img check`` finds the image clean and ``qemu-img compare``
equal to the reference, and ``qemu-img snapshot -a`` gives back the snapshot's data.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from blockd.snapshots import InternalSnapshots
from blockd.testing.images import qemu_img, qemu_io

# A directory on /dev/shm per test (the mapped-read tests' fixture).
from test_nbd_mapped_reads import shm  # noqa: F401
from test_qcow2 import Export, add_qcow2, close_and_verify, compare

nbd = pytest.importorskip("nbd")

pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing (qemu-utils)"),
    pytest.mark.skipif(not os.path.isdir("/dev/shm") or
                       subprocess.run(["stat", "-f", "-c", "%T", "/dev/shm"], capture_output=True,
                                      text=True).stdout.strip() != "tmpfs",
                       reason="/dev/shm is not a tmpfs here"),
]

KiB = 1 << 10
MiB = 1 << 20
SIZE = 24 * MiB


def make_image(path: Path) -> bytearray:
    """A 24 MiB image: 16 MiB of data written by qemu-io in an order that scatters some clusters,
    a zero range, a compressed cluster, the rest unallocated. Returns its content."""
    qemu_img("create", "-f", "qcow2", str(path), str(SIZE))
    reference = bytearray(SIZE)
    commands = []
    # Backwards in 1 MiB steps: each step contiguous, the steps out of order on the host.
    for step in reversed(range(16)):
        commands += ["-c", f"write -P {0x10 + step} {step * MiB} {MiB}"]
        reference[step * MiB:(step + 1) * MiB] = bytes([0x10 + step]) * MiB
    commands += ["-c", f"write -z {5 * MiB} {256 * KiB}", "-c", f"write -c -P 0x77 {17 * MiB} 64k"]
    reference[5 * MiB:5 * MiB + 256 * KiB] = bytes(256 * KiB)
    reference[17 * MiB:17 * MiB + 64 * KiB] = b"\x77" * 64 * KiB
    qemu_io(*commands, str(path))
    return reference


def ranges(rng: random.Random, count: int) -> list[tuple[int, int]]:
    """Large (and some small) ranges, aligned and not, anywhere on the disk."""
    chosen = []
    for _ in range(count):
        length = rng.choice([32 * KiB, 64 * KiB, 64 * KiB + 3, 200 * KiB, MiB, 2 * MiB])
        offset = rng.choice([rng.randrange(0, SIZE - length) & ~0xFFFF, rng.randrange(0, SIZE - length)])
        chosen.append((offset, length))
    return chosen


def pipelined(h: Any, reference: bytearray, rng: random.Random, count: int,
              between: Any = None) -> tuple[bytes, list[tuple[int, bytes]]]:
    """`count` writes to disjoint ranges and reads of other ranges, all in flight together (with
    `between` called while they are); then every read must match the reference as it was before,
    since no read overlaps a write. Returns the content before and the writes."""
    before = bytes(reference)
    writes: list[tuple[int, bytes]] = []
    taken: list[tuple[int, int]] = []
    for offset, length in ranges(rng, count):
        if all(offset + length <= a or offset >= b for a, b in taken):
            taken.append((offset, offset + length))
            writes.append((offset, rng.randbytes(length)))
    reads = [(o, n) for o, n in ranges(rng, count)
             if all(o + n <= a or o >= b for a, b in taken)]
    buffers = [nbd.Buffer(n) for _, n in reads]
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset)
               for offset, data in writes]
    cookies += [h.aio_pread(buffer, offset) for buffer, (offset, _) in zip(buffers, reads)]
    # The QMP command runs beside the client, as a management tool would: until the client has
    # sent its payloads and read its replies, mapped transfers hold the clusters they cover and a
    # snapshot waits for them.
    failures: list[BaseException] = []

    def management() -> None:
        try:
            between()
        except BaseException as error:  # re-raised in the test's thread
            failures.append(error)

    worker = threading.Thread(target=management) if between is not None else None
    if worker is not None:
        worker.start()
    pending = set(cookies)
    while pending:
        # aio_command_completed retires a command (and raises if it failed).
        done = {cookie for cookie in pending if h.aio_command_completed(cookie)}
        pending -= done
        if pending and not done:
            h.poll(-1)
    if worker is not None:
        worker.join()
    if failures:
        raise failures[0]
    for buffer, (offset, length) in zip(buffers, reads):
        assert buffer.to_bytearray() == reference[offset:offset + length], (offset, length)
    for offset, data in writes:
        reference[offset:offset + len(data)] = data
    return before, writes


def check_snapshot_content(actual: bytes, before: bytes, writes: list[tuple[int, bytes]]) -> None:
    """A snapshot taken while `writes` were in flight: outside them it shows `before`; inside,
    each cluster (64 KiB) shows either what it held before or what the write put there."""
    expected = bytearray(before)
    for offset, data in writes:
        end = offset + len(data)
        piece = offset
        while piece < end:
            stop = min((piece // (64 * KiB) + 1) * 64 * KiB, end)
            if actual[piece:stop] == data[piece - offset:stop - offset]:
                expected[piece:stop] = actual[piece:stop]
            piece = stop
    assert actual == expected


def test_large_io_snapshots_and_revert_match_reference(engine: Any, tmp_path: Path,
                                                      shm: Path) -> None:
    image = shm / "disk.qcow2"
    reference = make_image(image)
    add_qcow2(engine, image)
    export = Export(engine, tmp_path, writable=True)
    h = export.handle
    snaps = InternalSnapshots(engine, "disk")
    rng = random.Random(4)

    # Reads (the first ones fill the L2 cache; later ones are mapped), then writes in place.
    for offset, length in ranges(rng, 30):
        assert h.pread(length, offset) == reference[offset:offset + length], (offset, length)
    for offset, length in ranges(rng, 20):
        data = rng.randbytes(length)
        h.pwrite(data, offset)
        reference[offset:offset + length] = data
    assert h.pread(SIZE, 0) == reference

    # A snapshot taken while requests are in flight; then writes into shared clusters (copied
    # first, in place afterwards) and more pipelined traffic.
    pipelined(h, reference, rng, 24, between=lambda: snaps.create("one"))
    for _ in range(2):
        pipelined(h, reference, rng, 24)
    h.pwrite(b"\x5a" * 3 * MiB, 4 * MiB)
    h.pwrite(b"\xa5" * 3 * MiB, 4 * MiB)
    reference[4 * MiB:7 * MiB] = b"\xa5" * 3 * MiB
    assert h.pread(SIZE, 0) == reference
    h.flush()

    # A second snapshot, a delete and a revert while traffic runs.
    before, writes = pipelined(h, reference, rng, 16, between=lambda: snaps.create("two"))
    pipelined(h, reference, rng, 16, between=lambda: snaps.delete(name="one"))
    snaps.revert(name="two")
    at_two = h.pread(SIZE, 0)
    check_snapshot_content(at_two, before, writes)
    reference[:] = at_two
    pipelined(h, reference, rng, 16)
    assert h.pread(SIZE, 0) == reference

    expected = close_and_verify(engine, export, image, reference, shm)
    # The snapshot kept what the disk held when it was taken.
    qemu_img("snapshot", "-a", "two", str(image))
    expected.write_bytes(at_two)
    compare(expected, str(image), "qcow2")
