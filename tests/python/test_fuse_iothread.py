"""FUSE exports in an iothread (block-export-add type=fuse ... iothread=ID): the node moves to the
iothread and the export's requests are read from /dev/fuse, decoded, served and answered there.

Each test starts blockd-daemon with an iothread object, exports a file node through the kernel's
FUSE and checks the data through the mounted file and on the image underneath. That the requests
really run in the iothread is seen from outside: the CPU time the kernel accounts to the
iothread's thread (query-iothreads' thread-id) grows during a read loop, the main loop's does not.
Where qemu-storage-daemon gives an error for the same mistake, the messages are compared.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from test_fuse_export import (  # noqa: F401 - pytestmark skips without /dev/fuse
    MiB,
    Daemon,
    Setup,
    _direct_pread,
    _direct_pwrite,
    is_mounted,
    mmap_buffer,
    needs_passthrough,
    pytestmark,
    read_while_stopped,
    wait_unmounted,
)


def thread_ticks(pid: int, tid: int) -> int:
    """User + system CPU time (clock ticks) the kernel has accounted to thread `tid` of `pid`."""
    with open(f"/proc/{pid}/task/{tid}/stat") as stat_file:
        fields = stat_file.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def main_loop_tid(pid: int) -> int:
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/comm") as comm:
            if comm.read().strip() == "blockd-main":
                return int(task)
    raise AssertionError("no thread named blockd-main")


def iothread_tid(proc: Any, iothread: str = "io0") -> int:
    for info in proc.qmp.command("query-iothreads"):
        if info["id"] == iothread:
            return int(info["thread-id"])
    raise AssertionError(f"no iothread {iothread!r}")


def busy_threads(proc: Any, work: Any) -> tuple[int, int]:
    """Runs `work()`; returns the CPU ticks the iothread and the main loop spent meanwhile."""
    io_tid, main_tid = iothread_tid(proc), main_loop_tid(proc.pid)
    io_before, main_before = thread_ticks(proc.pid, io_tid), thread_ticks(proc.pid, main_tid)
    work()
    return (thread_ticks(proc.pid, io_tid) - io_before,
            thread_ticks(proc.pid, main_tid) - main_before)


def read_loop(mountpoint: Path, expected: bytes, rounds: int) -> None:
    """1 MiB reads through the daemon (a read-write open: read-only ones may be passthrough)."""
    fd = os.open(mountpoint, os.O_RDWR)
    try:
        for i in range(rounds):
            offset = (i % (len(expected) // MiB)) * MiB
            assert os.pread(fd, MiB, offset) == expected[offset:offset + MiB]
    finally:
        os.close(fd)


@pytest.fixture
def setup(tmp_path: Path, daemon: Daemon) -> Setup:
    return Setup(tmp_path, daemon, size=8 * MiB)


def test_io_runs_in_the_iothread(setup: Setup) -> None:
    """Reads, writes, fsync and truncate through an export in an iothread, checked byte for byte;
    the iothread does the work, the main loop stays idle; the node comes back when it is gone."""
    proc = setup.start("--object", "iothread,id=io0",
                       export=",writable=on,iothread=io0,fixed-iothread=on")
    assert is_mounted(setup.mountpoint)
    model = bytearray(setup.content)
    fd = os.open(setup.mountpoint, os.O_RDWR)
    try:
        patch = os.urandom(3 * MiB + 777)
        assert os.pwrite(fd, patch, 12345) == len(patch)
        model[12345:12345 + len(patch)] = patch
        os.fsync(fd)
        assert os.pread(fd, len(model), 0) == bytes(model)
        # Shrinking and growing borrow the resize permission (a graph change, on the main loop).
        os.ftruncate(fd, 5 * MiB)
        assert os.fstat(fd).st_size == 5 * MiB
        os.ftruncate(fd, 6 * MiB)
        model = model[:5 * MiB] + bytes(MiB)
        assert os.pread(fd, 6 * MiB, 0) == bytes(model)
    finally:
        os.close(fd)
    assert setup.image.read_bytes() == bytes(model)

    io_ticks, main_ticks = busy_threads(proc, lambda: read_loop(setup.mountpoint, bytes(model), 400))
    # 400 MiB read from the page cache into the export's buffers: many ticks, all in the iothread.
    assert io_ticks >= 5 and main_ticks <= max(2, io_ticks // 10), (io_ticks, main_ticks)

    # QEMU 7.2 deletes the iothread anyway and aborts on the next request; blockd refuses.
    reply = proc.qmp.cmd("object-del", id="io0")
    assert reply["error"]["desc"] == "object 'io0' is in use, can not be deleted"
    setup.delete()
    assert wait_unmounted(setup.mountpoint)
    proc.qmp.command("object-del", id="io0")  # the node is back on the main loop
    proc.qmp.command("blockdev-del", node_name="file0")


def test_concurrent_direct_readers_and_writers(setup: Setup) -> None:
    """O_DIRECT writers on disjoint blocks and readers all over, at once, from several threads:
    every write lands where it was written, every read sees old or new data of its block."""
    proc = setup.start("--object", "iothread,id=io0")
    setup.add(writable=True, iothread="io0")
    block = 256 * 1024
    blocks = len(setup.content) // block
    old = [setup.content[i * block:(i + 1) * block] for i in range(blocks)]
    new = [os.urandom(block) for _ in range(blocks)]
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            fd = os.open(setup.mountpoint, os.O_RDWR | os.O_DIRECT)
            try:
                for i in range(index, blocks, 4):
                    assert _direct_pwrite(fd, new[i], i * block) == block
            finally:
                os.close(fd)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def reader(index: int) -> None:
        try:
            fd = os.open(setup.mountpoint, os.O_RDWR | os.O_DIRECT)
            try:
                for round_ in range(2):
                    for i in range((index + round_) % 2, blocks, 2):
                        assert _direct_pread(fd, block, i * block) in (old[i], new[i])
            finally:
                os.close(fd)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert setup.image.read_bytes() == b"".join(new)
    proc.qmp.command("query-block-exports")  # the main loop still answers


def test_delete_in_flight_and_add_again(setup: Setup) -> None:
    """block-export-del while a client keeps reading and writing: the export goes (the client
    gets ENOTCONN-like errors, never wrong data), the node returns to the main loop, and the
    export can be added again, in the iothread or on the main loop."""
    proc = setup.start("--object", "iothread,id=io0")
    setup.add(writable=True, iothread="io0")
    stop = threading.Event()
    started = threading.Event()
    outcome: list[Any] = []
    pattern = os.urandom(MiB)

    def client() -> None:
        fd = os.open(setup.mountpoint, os.O_RDWR)
        try:
            while not stop.is_set():
                os.pwrite(fd, pattern, MiB)
                assert os.pread(fd, MiB, MiB) == pattern
                started.set()
        except OSError as error:
            outcome.append(error.errno)
        except BaseException as error:  # noqa: BLE001
            outcome.append(error)
        finally:
            started.set()
            try:
                os.close(fd)
            except OSError:
                pass

    thread = threading.Thread(target=client)
    thread.start()
    assert started.wait(30)
    setup.delete()
    stop.set()
    thread.join(30)
    assert not thread.is_alive()
    assert outcome in ([], [errno.ENOTCONN], [errno.ECONNABORTED], [errno.EIO]), outcome
    assert wait_unmounted(setup.mountpoint)
    assert setup.image.read_bytes()[MiB:2 * MiB] == pattern

    # Again in the same iothread, then in another one (the node came back, so it can move).
    for iothread in ("io0", "io1"):
        if iothread == "io1":
            proc.qmp.command("object-add", qom_type="iothread", id="io1")
        setup.add(writable=True, iothread=iothread, fixed_iothread=True)
        data = os.urandom(MiB)
        fd = os.open(setup.mountpoint, os.O_RDWR)
        try:
            assert os.pwrite(fd, data, 3 * MiB) == MiB
            assert os.pread(fd, MiB, 3 * MiB) == data
        finally:
            os.close(fd)
        setup.delete()
        assert setup.image.read_bytes()[3 * MiB:4 * MiB] == data
    proc.qmp.command("object-del", id="io0")
    proc.qmp.command("object-del", id="io1")
    # And on the main loop.
    setup.add()
    assert Path(setup.mountpoint).read_bytes()[MiB:2 * MiB] == pattern


def _mistakes(proc: Any, tmp_path: Path, name: str) -> list[str]:
    """The errors of iothread mistakes, and what the exports that succeed look like."""
    mount = [tmp_path / f"{name}-a", tmp_path / f"{name}-b"]
    for point in mount:
        point.touch()
    found = []

    def add(**options: Any) -> None:
        arguments = {"type": "fuse", "node-name": "file0"}
        arguments.update({key.replace("_", "-"): value for key, value in options.items()})
        arguments["mountpoint"] = str(arguments["mountpoint"])
        reply = proc.qmp.cmd("block-export-add", arguments)
        found.append(f"{reply['error']['class']}: {reply['error']['desc']}" if "error" in reply else "ok")

    add(id="e0", mountpoint=mount[0], iothread="nope")
    add(id="e0", mountpoint=mount[0], iothread="io0", node_name="ro", writable=True)
    add(id="e0", mountpoint=tmp_path / "missing", iothread="io0")
    add(id="e0", mountpoint=mount[0], iothread="io0", fixed_iothread=True, writable=True)
    add(id="e1", mountpoint=mount[0], iothread="io1")
    # The node is pinned to io0 by e0 (fixed-iothread): another iothread is refused when fixed...
    add(id="e1", mountpoint=mount[1], iothread="io1", fixed_iothread=True)
    # ...and served where the node is when not.
    add(id="e1", mountpoint=mount[1], iothread="io1")
    found.append(str(sorted(export["id"] for export in proc.qmp.command("query-block-exports"))))
    data = os.urandom(4096)
    fd = os.open(mount[0], os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)
    found.append(str(mount[1].read_bytes()[:4096] == data))
    for export in ("e1", "e0"):
        # hard: qemu-storage-daemon counts a request still in flight (the RELEASE that follows a
        # close) as a user of the export.
        proc.qmp.command("block-export-del", id=export, mode="hard")
        proc.qmp.event_wait("BLOCK_EXPORT_DELETED", timeout=10, match={"data": {"id": export}})
    assert wait_unmounted(mount[0]) and wait_unmounted(mount[1])
    return [line.replace(str(tmp_path), "TMP").replace(f"{name}-", "mnt-") for line in found]


@pytest.mark.requires_qsd
def test_mistakes_fail_as_in_qsd(tmp_path: Path, daemon: Daemon, qsd: Daemon) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(MiB))
    found = {}
    for name, factory in (("blockd", daemon), ("qsd", qsd)):
        proc = factory("--object", "iothread,id=io0", "--object", "iothread,id=io1",
                       "--blockdev", f"file,node-name=file0,filename={image},locking=off",
                       "--blockdev", f"file,node-name=ro,filename={image},read-only=on,locking=off")
        found[name] = _mistakes(proc, tmp_path, name)
    assert found["blockd"] == found["qsd"]
    assert found["blockd"] == [
        'GenericError: iothread "nope" not found',
        "GenericError: Cannot export read-only node as writable",
        "GenericError: Failed to stat 'TMP/missing': No such file or directory",
        "ok",
        "GenericError: There already is a FUSE export on 'TMP/mnt-a'",
        "GenericError: Cannot change iothread of active block backend",
        "ok",
        "['e0', 'e1']",
        "True",
    ]


def test_node_used_elsewhere_does_not_move(setup: Setup) -> None:
    """A node that an export on the main loop uses stays there: a new export in an iothread is
    served on the main loop, or fails with fixed-iothread. (qemu-storage-daemon moves both
    exports to the iothread instead.) And an export without iothread of a node that another
    export took to an iothread is served in that iothread."""
    proc = setup.start("--object", "iothread,id=io0")
    second = setup.mountpoint.with_name("mnt2")
    second.touch()
    setup.add(id="main0")
    reply = proc.qmp.cmd("block-export-add", {"type": "fuse", "id": "e1", "node-name": "file0",
                                              "mountpoint": str(second), "iothread": "io0",
                                              "fixed-iothread": True})
    assert reply["error"]["desc"] == "Cannot change iothread of active block backend"
    proc.qmp.command("block-export-add", {"type": "fuse", "id": "e1", "node-name": "file0",
                                          "mountpoint": str(second), "iothread": "io0",
                                          "writable": True})
    io_ticks, main_ticks = busy_threads(proc, lambda: read_loop(second, setup.content, 200))
    assert main_ticks >= 3 and io_ticks <= 1, (io_ticks, main_ticks)
    for export in ("e1", "main0"):
        setup.delete(export)
    proc.qmp.command("object-del", id="io0")  # nothing moved to it

    proc.qmp.command("object-add", qom_type="iothread", id="io0")
    setup.add(id="io", iothread="io0", writable=True)
    proc.qmp.command("block-export-add", {"type": "fuse", "id": "plain", "node-name": "file0",
                                          "mountpoint": str(second), "writable": True})
    io_ticks, main_ticks = busy_threads(proc, lambda: read_loop(second, setup.content, 200))
    assert io_ticks >= 3 and main_ticks <= max(2, io_ticks // 10), (io_ticks, main_ticks)
    # The first export goes; the node stays in io0 for the second, which keeps working.
    setup.delete("io")
    assert proc.qmp.cmd("object-del", id="io0")["error"]["desc"] == \
        "object 'io0' is in use, can not be deleted"
    read_loop(second, setup.content, 4)
    setup.delete("plain")
    proc.qmp.command("object-del", id="io0")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_daemon_exit_unmounts(setup: Setup, how: str) -> None:
    """SIGTERM stops the export in its iothread and exits cleanly; after kill -9 the export's
    watchdog unmounts."""
    proc = setup.start("--object", "iothread,id=io0", export=",writable=on,iothread=io0")
    assert is_mounted(setup.mountpoint)
    fd = os.open(setup.mountpoint, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"x" * 4096, 0) == 4096
    finally:
        os.close(fd)
    proc.send_signal(getattr(signal, how))
    status = proc.wait()
    if how == "SIGTERM":
        assert status == 0
    else:
        proc.expected_status = None
    assert wait_unmounted(setup.mountpoint)
    assert setup.image.read_bytes()[:4096] == b"x" * 4096


def test_growable_in_an_iothread(setup: Setup) -> None:
    """A write past the end grows the node from the iothread (the export holds resize)."""
    proc = setup.start("--object", "iothread,id=io0")
    setup.add(writable=True, growable=True, iothread="io0")
    fd = os.open(setup.mountpoint, os.O_RDWR)
    tail = os.urandom(4096)
    try:
        assert os.pwrite(fd, tail, 9 * MiB) == len(tail)
        assert os.fstat(fd).st_size == 9 * MiB + 4096
        assert os.pread(fd, MiB + 4096, 8 * MiB) == bytes(MiB) + tail
    finally:
        os.close(fd)
    assert setup.image.read_bytes() == setup.content + bytes(MiB) + tail
    proc.qmp.command("query-block-exports")


@needs_passthrough
def test_passthrough_in_an_iothread(setup: Setup) -> None:
    """Read-only opens of an export in an iothread are served by the kernel from the image (they
    read on while the daemon is stopped); writes beside them go through the iothread."""
    proc = setup.start("--object", "iothread,id=io0")
    setup.add(writable=True, iothread="io0")
    reader = os.open(setup.mountpoint, os.O_RDONLY)
    writer = os.open(setup.mountpoint, os.O_RDWR)
    try:
        assert read_while_stopped(proc, reader, MiB, MiB) == setup.content[MiB:2 * MiB]
        patch = os.urandom(MiB)
        assert os.pwrite(writer, patch, MiB) == MiB
        assert read_while_stopped(proc, reader, MiB, MiB) == patch
    finally:
        os.close(reader)
        os.close(writer)
