"""The quorum driver, blkdebug and the quorum events, seen through real clients.

Each test builds a quorum of three raw files (node names c0, c1, c2, or d<i> for a blkdebug filter
in front of child i), exports it over NBD and reads or writes it with libnbd; the child files are
read and changed directly, behind the engine's back. Events are checked with their exact payloads.
Tests on the `quorum` fixture run twice: with the child files on disk (tmp_path) and in memory
(a tmpfs under /dev/shm), where the driver reads and compares the children's files directly
(Node::map_file) and falls back to reading them through their nodes when they differ or when a
child is not a plain file in memory (blkdebug).
The rate limiting of events runs on the engine's manual test clock, so no test sleeps through a
window.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from blockd import Engine
from blockd.errors import ExecuteError
from blockd.testing.clients import import_libnbd

nbd = import_libnbd()
pytestmark = pytest.mark.skipif(nbd is None, reason="python3-libnbd (module nbd) is not installed")

SIZE = 4 << 20
MiB = 1 << 20


class Quorum:
    """An engine with three child files, a quorum node "q" over them and an NBD export of it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.paths = [directory / f"c{i}.raw" for i in range(3)]
        rng = random.Random(5)
        self.original = rng.randbytes(SIZE)
        for path in self.paths:
            path.write_bytes(self.original)
        self.engine = Engine()
        self.engine.core._test_manual_event_clock()
        self.socket = str(directory / "nbd.sock")
        self.handle: Any = None
        self.backlog: list[dict[str, Any]] = []

    def child(self, index: int, inject: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        file = {"driver": "file", "node-name": f"c{index}", "filename": str(self.paths[index])}
        if inject is None:
            return file
        return {"driver": "blkdebug", "node-name": f"d{index}", "image": file, "inject-error": inject}

    def open(self, children: list[dict[str, Any]] | None = None, **options: Any) -> Quorum:
        options.setdefault("vote-threshold", 2)
        self.engine.qmp("blockdev-add", {
            "driver": "quorum", "node-name": "q",
            "children": children if children is not None else [self.child(i) for i in range(3)],
            **options,
        })
        self.engine.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": self.socket}})
        self.engine.qmp("block-export-add", type="nbd", id="e", node_name="q", writable=True)
        handle = nbd.NBD()
        handle.set_export_name("q")
        handle.connect_unix(self.socket)
        self.handle = handle
        return self

    def corrupt(self, index: int, offset: int, data: bytes) -> None:
        with open(self.paths[index], "r+b") as f:
            f.seek(offset)
            f.write(data)

    def file_bytes(self, index: int, offset: int, length: int) -> bytes:
        with open(self.paths[index], "rb") as f:
            f.seek(offset)
            return f.read(length)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The data of every event `name` delivered and not yet taken (others stay for later)."""
        self.backlog += self.engine.events.get_all()
        taken = [event["data"] for event in self.backlog if event["event"] == name]
        self.backlog = [event for event in self.backlog if event["event"] != name]
        return taken

    def advance(self, seconds: float) -> None:
        self.engine.core._test_advance_event_clock(seconds)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.shutdown()
        self.engine.close()


def shm_is_tmpfs() -> bool:
    try:
        with open("/proc/mounts") as mounts:
            return any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in mounts)
    except OSError:
        return False


@pytest.fixture(params=["disk", "memory"])
def quorum(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Quorum]:
    if request.param == "disk":
        session = Quorum(tmp_path)
        yield session
        session.close()
        return
    if not shm_is_tmpfs():
        pytest.skip("/dev/shm is not a tmpfs here")
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="blockd-quorum-test-") as directory:
        session = Quorum(Path(directory))
        yield session
        session.close()


def bad(node: str, sector: int, count: int, op: str = "read", error: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"type": op, "node-name": node, "sector-num": sector, "sectors-count": count}
    if error is not None:
        data["error"] = error
    return data


def test_majority_outvotes_a_child_corrupted_behind_the_engines_back(quorum: Quorum) -> None:
    quorum.open()
    quorum.corrupt(1, MiB + 700, b"\xff" * 1000)
    assert quorum.handle.pread(MiB, MiB) == quorum.original[MiB:2 * MiB]
    assert quorum.events("QUORUM_REPORT_BAD") == [bad("c1", 2048, 2048)]
    # An unaligned request covers the sectors it touches.
    quorum.advance(1)
    quorum.handle.pread(1000, MiB + 600)
    quorum.advance(1)
    assert quorum.events("QUORUM_REPORT_BAD") == [bad("c1", 2049, 3)]
    # Without rewrite-corrupted the bad copy stays as it is.
    assert quorum.file_bytes(1, MiB + 700, 1000) == b"\xff" * 1000
    assert quorum.events("QUORUM_FAILURE") == []


@pytest.mark.parametrize("length", [4096, 3 * MiB])
def test_corruption_anywhere_in_small_and_large_reads_is_outvoted(quorum: Quorum, length: int) -> None:
    # Large reads in memory compare their halves on two threads: corrupt each half in turn.
    quorum.open(**{"rewrite-corrupted": True})
    for child, at in [(1, length // 4), (2, length - 1), (0, length // 2 + 1)]:
        quorum.advance(1)
        quorum.corrupt(child, 512 + at, b"\x55")
        assert quorum.handle.pread(length, 512) == quorum.original[512:512 + length]
        quorum.advance(1)
        assert quorum.events("QUORUM_REPORT_BAD") == [bad(f"c{child}", 1, length // 512)]
        assert quorum.file_bytes(child, 0, SIZE) == quorum.original
    quorum.advance(1)
    assert quorum.handle.pread(length, 512) == quorum.original[512:512 + length]
    quorum.advance(1)
    assert quorum.events("QUORUM_REPORT_BAD") == []


def test_a_child_truncated_behind_the_engines_back_is_outvoted(quorum: Quorum) -> None:
    quorum.open()
    with open(quorum.paths[2], "r+b") as f:
        f.truncate(MiB + 1000)
    # The lost tail reads as zeroes and loses the vote; the engine carries on.
    assert quorum.handle.pread(2 * MiB, MiB) == quorum.original[MiB:3 * MiB]
    assert quorum.events("QUORUM_REPORT_BAD") == [bad("c2", 2048, 4096)]
    quorum.advance(1)
    assert quorum.handle.pread(4096, 3 * MiB) == quorum.original[3 * MiB:3 * MiB + 4096]
    quorum.advance(1)
    assert quorum.events("QUORUM_REPORT_BAD") == [bad("c2", 6144, 8)]
    assert quorum.handle.pread(4096, 0) == quorum.original[:4096]
    assert quorum.engine.qmp("query-version")["qemu"]["major"] == 7


def test_large_reads_sent_from_child_0_are_verified_each_time(quorum: Quorum) -> None:
    # In memory, a large read on which the children agree goes out of child 0's file (the quorum
    # grants the export child 0's range once it has compared all three); no verdict is kept, so a
    # byte corrupted afterwards, on child 0 as on the others, is caught by the next read.
    quorum.open(**{"rewrite-corrupted": True})
    expected = quorum.original[2 * MiB:3 * MiB]
    for child in (0, 1, 2):
        assert quorum.handle.pread(MiB, 2 * MiB) == expected
        assert quorum.events("QUORUM_REPORT_BAD") == []
        quorum.advance(1)
        at = 2 * MiB + 300_000 * child + 1
        quorum.corrupt(child, at, bytes([quorum.original[at] ^ 0xAA]))
        assert quorum.handle.pread(MiB, 2 * MiB) == expected
        quorum.advance(1)
        assert quorum.events("QUORUM_REPORT_BAD") == [bad(f"c{child}", 4096, 2048)]
        assert quorum.file_bytes(child, 0, SIZE) == quorum.original
    assert quorum.handle.pread(MiB, 2 * MiB) == expected


def test_a_child_shrinking_during_large_reads_is_outvoted(quorum: Quorum) -> None:
    # Child 2's file loses its second half and gets it back, over and over, while large reads
    # compare the children in place in their mappings (in memory): a comparison that touches a
    # page just gone takes a SIGBUS, which the engine turns into a difference (under pytest,
    # whose faulthandler also handles SIGBUS); the read then votes. Every read returns the
    # majority's data and the engine lives on.
    quorum.open()
    half = SIZE // 2
    tail = quorum.original[half:]
    stop = threading.Event()

    def shrink_and_grow() -> None:
        fd = os.open(quorum.paths[2], os.O_RDWR)
        try:
            while not stop.is_set():
                os.ftruncate(fd, half)
                os.pwrite(fd, tail, half)
        finally:
            os.close(fd)

    shrinker = threading.Thread(target=shrink_and_grow)
    shrinker.start()
    try:
        deadline = time.monotonic() + 1.5
        reads = 0
        while time.monotonic() < deadline or reads < 20:
            offset = half - MiB // 2 + (reads % 4) * 4096
            assert quorum.handle.pread(MiB, offset) == quorum.original[offset:offset + MiB]
            reads += 1
    finally:
        stop.set()
        shrinker.join()
    reported = {event["node-name"] for event in quorum.events("QUORUM_REPORT_BAD")}
    assert reported <= {"c2"}
    assert quorum.engine.qmp("query-version")["qemu"]["major"] == 7


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing (qemu-utils)")
def test_qcow2_children_are_compared_where_their_clusters_lie(quorum: Quorum) -> None:
    # qcow2 children map reads of allocated clusters onto their image files (in memory: the fast
    # path); a cluster corrupted in one image file is outvoted like a corrupt raw file.
    images = [quorum.directory / f"c{i}.qcow2" for i in range(3)]
    for path, image in zip(quorum.paths, images):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(path), str(image)],
                       check=True, capture_output=True)
    extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(images[1])],
                                        check=True, capture_output=True, text=True).stdout)
    guest = 2 * MiB + 1000
    host = next(e["offset"] + guest - e["start"] for e in extents
                if e["data"] and e["start"] <= guest < e["start"] + e["length"])
    children = [{"driver": "qcow2", "node-name": f"c{i}",
                 "file": {"driver": "file", "filename": str(image)}} for i, image in enumerate(images)]
    quorum.open(children)
    for length in (4096, MiB):
        assert quorum.handle.pread(length, 2 * MiB) == quorum.original[2 * MiB:2 * MiB + length]
    assert quorum.events("QUORUM_REPORT_BAD") == []
    with open(images[1], "r+b") as f:
        f.seek(host)
        f.write(b"\xee" * 100)
    for length in (4096, MiB):
        quorum.advance(1)
        assert quorum.handle.pread(length, 2 * MiB) == quorum.original[2 * MiB:2 * MiB + length]
        quorum.advance(1)
        assert quorum.events("QUORUM_REPORT_BAD") == [bad("c1", 4096, length // 512)]


def test_rewrite_corrupted_repairs_the_child(quorum: Quorum) -> None:
    quorum.open(**{"rewrite-corrupted": True})
    quorum.corrupt(2, 3 * MiB, b"\x00" * 4096)
    assert quorum.handle.pread(65536, 3 * MiB) == quorum.original[3 * MiB:3 * MiB + 65536]
    assert quorum.events("QUORUM_REPORT_BAD") == [bad("c2", 6144, 128)]
    assert quorum.file_bytes(2, 3 * MiB, 4096) == quorum.original[3 * MiB:3 * MiB + 4096]
    quorum.advance(1)
    quorum.handle.pread(65536, 3 * MiB)
    quorum.advance(1)
    assert quorum.events("QUORUM_REPORT_BAD") == []


def test_a_failing_child_is_reported_with_its_error(quorum: Quorum) -> None:
    inject = [{"event": "read_aio", "errno": errno.EIO}]
    quorum.open([quorum.child(0), quorum.child(1, inject), quorum.child(2)])
    assert quorum.handle.pread(4096, 8192) == quorum.original[8192:12288]
    assert quorum.events("QUORUM_REPORT_BAD") == [bad("d1", 16, 8, error="Input/output error")]


def test_blkdebug_corruption_is_outvoted_and_once_rules_fire_once(quorum: Quorum) -> None:
    inject = [{"event": "read_aio", "errno": errno.ENOSPC, "sector": 100, "once": True}]
    quorum.open([quorum.child(0, inject), quorum.child(1), quorum.child(2)])
    assert quorum.handle.pread(512, 0) == quorum.original[:512]  # sector 100 not touched
    assert quorum.handle.pread(4096, 98 * 512) == quorum.original[98 * 512:98 * 512 + 4096]
    assert quorum.handle.pread(4096, 98 * 512) == quorum.original[98 * 512:98 * 512 + 4096]
    quorum.advance(1)
    assert quorum.events("QUORUM_REPORT_BAD") == [bad("d0", 98, 8, error="No space left on device")]


def test_two_bad_children_with_threshold_two_fail_the_read(quorum: Quorum) -> None:
    quorum.open()
    quorum.corrupt(0, 2 * MiB, b"A" * 512)
    quorum.corrupt(2, 2 * MiB, b"B" * 512)
    with pytest.raises(nbd.Error) as info:
        quorum.handle.pread(4096, 2 * MiB)
    assert info.value.errno == "EIO"
    assert quorum.events("QUORUM_FAILURE") == [{"reference": "q", "sector-num": 4096, "sectors-count": 8}]
    assert quorum.events("QUORUM_REPORT_BAD") == []
    # The rest of the disk still reads.
    assert quorum.handle.pread(4096, 0) == quorum.original[:4096]


def test_two_failing_children_fail_the_read_with_their_error(quorum: Quorum) -> None:
    inject = [{"event": "read_aio", "errno": errno.EIO}]
    quorum.open([quorum.child(0), quorum.child(1, inject), quorum.child(2, inject)])
    with pytest.raises(nbd.Error) as info:
        quorum.handle.pread(512, 0)
    assert info.value.errno == "EIO"
    assert quorum.events("QUORUM_REPORT_BAD") == [
        bad("d1", 0, 1, error="Input/output error"), bad("d2", 0, 1, error="Input/output error")]
    assert quorum.events("QUORUM_FAILURE") == [{"reference": "q", "sector-num": 0, "sectors-count": 1}]


def test_fifo_reads_children_in_order(quorum: Quorum) -> None:
    inject = [{"event": "read_aio"}]
    quorum.corrupt(2, 0, b"Z" * 512)  # never read: child 1 answers
    quorum.open([quorum.child(0, inject), quorum.child(1), quorum.child(2)],
                **{"read-pattern": "fifo", "vote-threshold": 1})
    assert quorum.handle.pread(512, 0) == quorum.original[:512]
    assert quorum.events("QUORUM_REPORT_BAD") == [bad("d0", 0, 1, error="Input/output error")]


def test_writes_and_flushes_survive_one_failing_child(quorum: Quorum) -> None:
    inject = [{"event": "write_aio"}, {"event": "flush_to_os", "iotype": "flush"}]
    quorum.open([quorum.child(0), quorum.child(1), quorum.child(2, inject)])
    data = b"W" * 8192
    quorum.handle.pwrite(data, MiB)
    assert quorum.events("QUORUM_REPORT_BAD") == [bad("d2", 2048, 16, "write", "Input/output error")]
    quorum.advance(1)  # close d2's rate-limiting window
    quorum.handle.flush()
    assert quorum.events("QUORUM_REPORT_BAD") == [bad("d2", 0, 0, "flush", "Input/output error")]
    assert quorum.file_bytes(0, MiB, 8192) == data
    assert quorum.file_bytes(1, MiB, 8192) == data
    assert quorum.file_bytes(2, MiB, 8192) == quorum.original[MiB:MiB + 8192]
    assert quorum.events("QUORUM_FAILURE") == []
    # Reads still agree where the two good children outvote the stale one.
    quorum.advance(1)
    assert quorum.handle.pread(8192, MiB) == data
    quorum.advance(1)
    assert quorum.events("QUORUM_REPORT_BAD") == [bad("d2", 2048, 16)]


def test_large_writes_reach_every_child_and_reads_still_compare_them(quorum: Quorum) -> None:
    # In memory a 1 MiB write goes into the three files from a worker thread; the next large read
    # compares all three again, and a byte corrupted behind the engine's back is outvoted.
    quorum.open()
    data = random.Random(7).randbytes(MiB)
    quorum.handle.pwrite(data, MiB)
    for child in range(3):
        assert quorum.file_bytes(child, MiB, MiB) == data
    assert quorum.handle.pread(MiB, MiB) == data
    assert quorum.events("QUORUM_REPORT_BAD") == []
    quorum.advance(1)
    quorum.corrupt(1, MiB + 12345, bytes([data[12345] ^ 0x01]))
    assert quorum.handle.pread(MiB, MiB) == data
    quorum.advance(1)
    assert quorum.events("QUORUM_REPORT_BAD") == [bad("c1", 2048, 2048)]


def test_writes_fail_below_the_threshold(quorum: Quorum) -> None:
    inject = [{"event": "write_aio", "errno": errno.ENOSPC}]
    quorum.open([quorum.child(0), quorum.child(1, inject), quorum.child(2, inject)])
    with pytest.raises(nbd.Error) as info:
        quorum.handle.pwrite(b"x" * 512, 0)
    assert info.value.errno == "ENOSPC"
    assert quorum.events("QUORUM_FAILURE") == [{"reference": "q", "sector-num": 0, "sectors-count": 1}]


def test_rate_limiting_on_the_test_clock(quorum: Quorum) -> None:
    quorum.open(**{"vote-threshold": 1})
    quorum.corrupt(1, 0, b"1" * 4 * MiB)
    quorum.corrupt(2, 0, b"2" * 4 * MiB)
    for sector in (0, 8, 16):
        quorum.handle.pread(512, sector * 512)
    # The first of each node at once; the rest wait for the window to close.
    first = quorum.events("QUORUM_REPORT_BAD")
    assert sorted(first, key=lambda d: d["node-name"]) == [bad("c0", 0, 1), bad("c1", 0, 1)]
    quorum.advance(0.999)
    assert quorum.events("QUORUM_REPORT_BAD") == []
    quorum.advance(0.001)
    newest = quorum.events("QUORUM_REPORT_BAD")
    assert sorted(newest, key=lambda d: d["node-name"]) == [bad("c0", 16, 1), bad("c1", 16, 1)]
    # The window that just closed delivered something, so a new one is open.
    quorum.handle.pread(512, 24 * 512)
    assert quorum.events("QUORUM_REPORT_BAD") == []
    quorum.advance(5)
    assert len(quorum.events("QUORUM_REPORT_BAD")) == 2


def test_quorum_failure_has_a_single_slot(tmp_path: Path) -> None:
    session = Quorum(tmp_path)
    try:
        session.open()
        session.corrupt(0, 0, b"0" * MiB)
        session.corrupt(1, 0, b"1" * MiB)
        for sector in (0, 8, 16):
            with pytest.raises(nbd.Error):
                session.handle.pread(512, sector * 512)
        assert session.events("QUORUM_FAILURE") == [{"reference": "q", "sector-num": 0, "sectors-count": 1}]
        session.advance(1)
        assert session.events("QUORUM_FAILURE") == [{"reference": "q", "sector-num": 16, "sectors-count": 1}]
        session.advance(1)
        assert session.events("QUORUM_FAILURE") == []
    finally:
        session.close()


def test_blkverify_mismatch_is_an_error_and_the_engine_lives_on(quorum: Quorum) -> None:
    quorum.open([quorum.child(0), quorum.child(1)], blkverify=True)
    quorum.corrupt(1, 0, b"X")
    with pytest.raises(nbd.Error) as info:
        quorum.handle.pread(512, 0)
    assert info.value.errno == "EIO"
    assert quorum.events("QUORUM_FAILURE") == [{"reference": "q", "sector-num": 0, "sectors-count": 1}]
    assert quorum.handle.pread(512, 512) == quorum.original[512:1024]
    assert quorum.engine.qmp("query-version")["qemu"]["major"] == 7


def test_children_are_read_in_parallel(tmp_path: Path) -> None:
    # Three null-co children that each take 200 ms: a quorum read takes about one delay, not three.
    with Engine() as engine:
        delay = 200_000_000
        engine.qmp("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 3, "children": [
            {"driver": "null-co", "size": MiB, "latency-ns": delay, "read-zeroes": True} for _ in range(3)]})
        engine.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "s")}})
        engine.qmp("block-export-add", type="nbd", id="e", node_name="q")
        handle = nbd.NBD()
        handle.set_export_name("q")
        handle.connect_unix(str(tmp_path / "s"))
        start = time.monotonic()
        assert handle.pread(4096, 0) == bytes(4096)
        elapsed = time.monotonic() - start
        handle.shutdown()
    assert 0.2 <= elapsed < 0.5, elapsed  # serial reads would take 0.6 s


def test_x_blockdev_change_adds_and_removes_children(quorum: Quorum) -> None:
    quorum.open()
    engine = quorum.engine
    spare = quorum.directory / "spare.raw"
    spare.write_bytes(quorum.original)
    engine.qmp("blockdev-add", driver="file", node_name="spare", filename=str(spare))
    engine.qmp("x-blockdev-change", parent="q", node="spare")

    def children() -> list[str]:
        nodes = {n["node-name"]: n for n in engine.qmp("query-named-block-nodes")}
        return [child["filename"] for child in json.loads(nodes["q"]["file"].removeprefix("json:"))["children"]]

    assert children() == [str(p) for p in quorum.paths] + [str(spare)]
    with pytest.raises(ExecuteError) as info:
        engine.qmp("x-blockdev-change", parent="q", node="spare")
    assert info.value.desc == "The node spare already has a parent"
    # Remove two children: the quorum keeps working on the others.
    engine.qmp("x-blockdev-change", parent="q", child="children.0")
    engine.qmp("x-blockdev-change", parent="q", child="children.1")
    with pytest.raises(ExecuteError) as info:
        engine.qmp("x-blockdev-change", parent="q", child="children.2")
    assert info.value.desc == "The number of children cannot be lower than the vote threshold 2"
    quorum.handle.pwrite(b"N" * 4096, 0)
    assert spare.read_bytes()[:4096] == b"N" * 4096
    assert quorum.file_bytes(2, 0, 4096) == b"N" * 4096
    assert quorum.file_bytes(0, 0, 4096) == quorum.original[:4096]


def test_children_change_while_exported_from_an_iothread(quorum: Quorum) -> None:
    engine = quorum.engine
    engine.qmp("object-add", qom_type="iothread", id="io0")
    for index in range(3):
        engine.qmp("blockdev-add", quorum.child(index))
    engine.qmp("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 2,
                                "children": ["c0", "c1", "c2"]})
    engine.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": quorum.socket}})
    engine.qmp("block-export-add", type="nbd", id="e", node_name="q", writable=True, iothread="io0")
    handle = nbd.NBD()
    handle.set_export_name("q")
    handle.connect_unix(quorum.socket)
    quorum.handle = handle
    spare = quorum.directory / "spare.raw"
    spare.write_bytes(quorum.original)
    engine.qmp("blockdev-add", driver="file", node_name="spare", filename=str(spare))
    engine.qmp("x-blockdev-change", parent="q", node="spare")
    engine.qmp("x-blockdev-change", parent="q", child="children.0")
    handle.pwrite(b"I" * 4096, 0)
    assert spare.read_bytes()[:4096] == b"I" * 4096
    quorum.corrupt(1, 0, b"x" * 512)
    assert handle.pread(4096, 0) == b"I" * 4096
    assert quorum.events("QUORUM_REPORT_BAD") == [bad("c1", 0, 8)]
    # The removed child is the monitor's again, on the main loop: a new parent may take it.
    engine.qmp("blockdev-add", driver="raw", node_name="r0", file="c0")
