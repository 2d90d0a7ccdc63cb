"""The FUSE export on the kernel's FUSE: blockd-daemon mounts a node over a regular file, and
ordinary tools (dd, cmp, fio, qemu-img, plain system calls) check what they see through it.

Each test reads like a session: start the daemon with a file node, export it (on the command line
or over QMP), use the mounted file, and check the data on the image underneath with an
independent path (the image file itself). Where qemu-storage-daemon gives an error for the same
mistake, the test compares the two messages.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest



def _fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this kernel or container)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (Debian package fuse3)"
    return None


pytestmark = pytest.mark.skipif(_fuse_unavailable() is not None, reason=str(_fuse_unavailable()))

MiB = 1 << 20
Daemon = Callable[..., Any]


def fuse_mounts() -> dict[str, str]:
    """Mount point -> mount options of every FUSE mount this process can see."""
    mounts = {}
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            separator = fields.index("-")
            if fields[separator + 1].startswith("fuse"):
                point = fields[4].encode().decode("unicode_escape")
                mounts[point] = fields[5] + "," + fields[separator + 3]
    return mounts


def is_mounted(path: Path) -> bool:
    return str(path) in fuse_mounts()


def wait_unmounted(path: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while is_mounted(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def make_image(path: Path, size: int, data: bytes | None = None) -> bytes:
    """A raw image of `size` bytes filled with `data` (random when None); returns the content."""
    content = data if data is not None else os.urandom(size)
    path.write_bytes(content)
    return content


class Setup:
    """An image, a mount point and a daemon exporting the image's file node."""

    def __init__(self, tmp_path: Path, daemon: Daemon, size: int = 4 * MiB, data: bytes | None = None,
                 image_name: str = "disk.raw") -> None:
        self.image = tmp_path / image_name
        self.content = make_image(self.image, size, data)
        self.mountpoint = tmp_path / "mnt"
        self.mountpoint.touch()
        self.daemon_factory = daemon
        self.proc: Any = None

    def start(self, *extra: str, export: str | None = None, file_options: str = "") -> Any:
        args = ["--blockdev", f"file,node-name=file0,filename={self.image}{file_options}", *extra]
        if export is not None:
            args += ["--export", f"fuse,id=exp0,node-name=file0,mountpoint={self.mountpoint}" + export]
        self.proc = self.daemon_factory(*args)
        return self.proc

    def add(self, **options: Any) -> None:
        arguments = {"type": "fuse", "id": "exp0", "node-name": "file0", "mountpoint": str(self.mountpoint)}
        arguments.update({key.replace("_", "-"): value for key, value in options.items()})
        self.proc.qmp.command("block-export-add", arguments)

    def delete(self, id: str = "exp0") -> None:
        self.proc.qmp.command("block-export-del", id=id)
        self.proc.qmp.event_wait("BLOCK_EXPORT_DELETED", timeout=10, match={"data": {"id": id}})


@pytest.fixture
def setup(tmp_path: Path, daemon: Daemon) -> Setup:
    return Setup(tmp_path, daemon)


def run(*command: str | Path, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, check=check,
                          timeout=timeout)


# ---- Data through ordinary tools.


def test_dd_and_cmp_round_trip(setup: Setup, tmp_path: Path) -> None:
    setup.start(export=",writable=on")
    assert is_mounted(setup.mountpoint)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(setup.content)
    run("cmp", setup.mountpoint, expected)

    # dd writes 1 MiB at 1 MiB (direct I/O) and 3 odd-sized blocks at an unaligned offset.
    patch = os.urandom(MiB)
    (tmp_path / "patch").write_bytes(patch)
    run("dd", f"if={tmp_path / 'patch'}", f"of={setup.mountpoint}", "bs=1M", "seek=1", "conv=notrunc",
        "oflag=direct", "status=none")
    small = os.urandom(3 * 1000)
    (tmp_path / "small").write_bytes(small)
    run("dd", f"if={tmp_path / 'small'}", f"of={setup.mountpoint}", "bs=1000", "seek=3333", "conv=notrunc",
        "status=none")
    model = bytearray(setup.content)
    model[MiB:2 * MiB] = patch
    model[3333000:3336000] = small
    expected.write_bytes(model)
    run("cmp", setup.mountpoint, expected)
    # What dd wrote reached the image underneath, and reads back through dd.
    assert setup.image.read_bytes() == bytes(model)
    run("dd", f"if={setup.mountpoint}", f"of={tmp_path / 'back'}", "bs=1M", "skip=1", "count=1",
        "iflag=direct", "status=none")
    assert (tmp_path / "back").read_bytes() == patch


def test_qemu_img_info_and_compare(setup: Setup, tmp_path: Path) -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is missing (Debian package qemu-utils)")
    setup.start(export="")
    info = run("qemu-img", "info", "-U", "--output=json", "-f", "raw", setup.mountpoint).stdout
    assert '"virtual-size": 4194304' in info
    copy = tmp_path / "copy.raw"
    copy.write_bytes(setup.content)
    run("qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", setup.mountpoint, copy)
    copy.write_bytes(setup.content[:-1] + bytes([setup.content[-1] ^ 1]))
    differs = run("qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", setup.mountpoint, copy, check=False)
    assert differs.returncode == 1, differs.stdout + differs.stderr


@pytest.mark.parametrize("engine", ["io_uring", "psync"])
def test_fio_writes_and_verifies(setup: Setup, engine: str) -> None:
    if shutil.which("fio") is None:
        pytest.skip("fio is missing (Debian package fio)")
    setup.start(export=",writable=on")
    depth = ["--iodepth=16"] if engine == "io_uring" else ["--numjobs=1"]
    job = ["fio", "--name=verify", f"--filename={setup.mountpoint}", f"--ioengine={engine}", "--direct=1",
           "--rw=randwrite", "--bsrange=4k-256k", "--size=4M", "--verify=crc32c", "--verify_fatal=1",
           "--do_verify=1", "--verify_state_save=0", "--randrepeat=0", *depth]
    result = run(*job, check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify: bad" not in result.stdout + result.stderr


def test_many_concurrent_readers_and_writers(setup: Setup) -> None:
    setup.start(export=",writable=on")
    chunk = 64 * 1024
    regions = 4 * MiB // chunk
    patterns = [os.urandom(chunk) for _ in range(regions)]
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            fd = os.open(setup.mountpoint, os.O_WRONLY)
            try:
                for region in range(index, regions, 8):
                    assert os.pwrite(fd, patterns[region], region * chunk) == chunk
            finally:
                os.close(fd)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def reader() -> None:
        try:
            fd = os.open(setup.mountpoint, os.O_RDONLY)
            try:
                for offset in range(0, 4 * MiB, 256 * 1024):
                    assert len(os.pread(fd, 256 * 1024, offset)) == 256 * 1024
            finally:
                os.close(fd)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=reader) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    written = b"".join(patterns)
    assert Path(setup.mountpoint).read_bytes() == written
    assert setup.image.read_bytes() == written


# ---- File semantics.


def test_seek_data_and_seek_hole(setup: Setup, tmp_path: Path) -> None:
    image = tmp_path / "sparse.raw"
    with open(image, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"x" * 65536)
        f.seek(3 * MiB)
        f.write(b"y" * 65536)
    fd = os.open(image, os.O_RDONLY)
    sparse = os.lseek(fd, 0, os.SEEK_DATA) == MiB
    os.close(fd)
    if not sparse:
        pytest.skip(f"the file system under {tmp_path} does not report holes")
    setup.image = image
    setup.start(export="")
    fd = os.open(setup.mountpoint, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == MiB
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, MiB + 100, os.SEEK_HOLE) == MiB + 65536
        assert os.lseek(fd, MiB + 65536, os.SEEK_DATA) == 3 * MiB
        assert os.lseek(fd, 3 * MiB, os.SEEK_HOLE) == 3 * MiB + 65536
        with pytest.raises(OSError) as info:
            os.lseek(fd, 3 * MiB + 65536, os.SEEK_DATA)
        assert info.value.errno == errno.ENXIO
        assert os.lseek(fd, 0, os.SEEK_END) == 4 * MiB
    finally:
        os.close(fd)


def test_growable_off_refuses_writes_past_the_end(setup: Setup) -> None:
    setup.start(export=",writable=on")
    fd = os.open(setup.mountpoint, os.O_RDWR)
    try:
        # A write that starts inside and runs past the end is cut short; one at the end fails.
        assert os.pwrite(fd, b"z" * 8192, 4 * MiB - 4096) == 4096
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"z" * 4096, 4 * MiB)
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert os.stat(setup.mountpoint).st_size == 4 * MiB
    assert setup.image.stat().st_size == 4 * MiB
    assert setup.image.read_bytes()[-4096:] == b"z" * 4096


def test_growable_on_grows_the_node(setup: Setup) -> None:
    setup.start(export=",writable=on,growable=on")
    fd = os.open(setup.mountpoint, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"g" * 4096, 5 * MiB) == 4096
    finally:
        os.close(fd)
    assert os.stat(setup.mountpoint).st_size == 5 * MiB + 4096
    assert setup.image.stat().st_size == 5 * MiB + 4096
    data = setup.image.read_bytes()
    assert data[:4 * MiB] == setup.content
    assert data[4 * MiB:5 * MiB] == bytes(MiB)
    assert data[5 * MiB:] == b"g" * 4096


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10


def test_truncate_fallocate_and_fsync(setup: Setup) -> None:
    setup.start(export=",writable=on")
    fd = os.open(setup.mountpoint, os.O_RDWR)
    try:
        # Punch hole: the range reads as zeroes (and the image underneath too).
        _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MiB, 65536)
        assert os.pread(fd, 65536, MiB) == bytes(65536)
        # Zero range without KEEP_SIZE past the end grows the file.
        _fallocate(fd, FALLOC_FL_ZERO_RANGE, 4 * MiB - 4096, 8192)
        assert os.fstat(fd).st_size == 4 * MiB + 4096
        assert os.pread(fd, 8192, 4 * MiB - 4096) == bytes(8192)
        # Plain allocation keeps the data.
        _fallocate(fd, 0, 0, 2 * MiB)
        assert os.pread(fd, 4096, 0) == setup.content[:4096]
        with pytest.raises(OSError) as info:
            _fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, 4096)
        assert info.value.errno == errno.EOPNOTSUPP
        os.fsync(fd)
        # truncate shrinks and grows the node even when not growable (as qemu-storage-daemon).
        os.ftruncate(fd, 2 * MiB)
        assert os.fstat(fd).st_size == 2 * MiB
        assert setup.image.stat().st_size == 2 * MiB
        os.ftruncate(fd, 3 * MiB)
        assert os.pread(fd, 4096, 2 * MiB) == bytes(4096)
    finally:
        os.close(fd)
    data = setup.image.read_bytes()
    assert len(data) == 3 * MiB
    assert data[MiB:MiB + 65536] == bytes(65536)
    assert data[:MiB] == setup.content[:MiB]


def test_read_only_export_refuses_writes(setup: Setup) -> None:
    setup.start(export="")
    mode = stat.S_IMODE(os.stat(setup.mountpoint).st_mode)
    assert mode == 0o400
    # Even root, whom the kernel lets past the mode, is refused.
    for flags in (os.O_RDWR, os.O_WRONLY):
        with pytest.raises(PermissionError):
            os.open(setup.mountpoint, flags)
    with pytest.raises(PermissionError):
        os.truncate(setup.mountpoint, MiB)
    with pytest.raises(OSError) as info:
        os.chmod(setup.mountpoint, 0o600)
    assert info.value.errno == errno.EROFS
    assert setup.image.read_bytes() == setup.content


def test_mode_shows_writable_and_chmod_sticks(setup: Setup) -> None:
    setup.start(export=",writable=on")
    assert stat.S_IMODE(os.stat(setup.mountpoint).st_mode) == 0o600
    os.chmod(setup.mountpoint, 0o640)
    assert stat.S_IMODE(os.stat(setup.mountpoint).st_mode) == 0o640
    st = os.stat(setup.mountpoint)
    assert st.st_size == 4 * MiB
    assert st.st_blocks * 512 >= 4 * MiB  # the image is fully written


# ---- QMP: creation errors, query, deletion.


def _errors(proc: Any, mountpoint: Path, tmp_path: Path) -> list[str]:
    directory = tmp_path / "dir"
    directory.mkdir(exist_ok=True)
    messages = []
    for point in (directory, tmp_path / "missing"):
        reply = proc.qmp.cmd("block-export-add", {"type": "fuse", "id": "bad", "node-name": "file0",
                                                  "mountpoint": str(point)})
        messages.append(f"{reply['error']['class']}: {reply['error']['desc']}")
    proc.qmp.command("block-export-add", {"type": "fuse", "id": "exp0", "node-name": "file0",
                                          "mountpoint": str(mountpoint)})
    reply = proc.qmp.cmd("block-export-add", {"type": "fuse", "id": "exp1", "node-name": "file0",
                                              "mountpoint": str(mountpoint)})
    messages.append(f"{reply['error']['class']}: {reply['error']['desc']}")
    reply = proc.qmp.cmd("block-export-add", {"type": "fuse", "id": "exp2", "node-name": "ro",
                                              "mountpoint": str(mountpoint), "writable": True})
    messages.append(f"{reply['error']['class']}: {reply['error']['desc']}")
    return messages


@pytest.mark.requires_qsd
def test_bad_mountpoints_fail_as_in_qsd(tmp_path: Path, daemon: Daemon, qsd: Daemon) -> None:
    image = tmp_path / "disk.raw"
    make_image(image, MiB)
    found = {}
    for name, factory in (("blockd", daemon), ("qsd", qsd)):
        mountpoint = tmp_path / f"mnt-{name}"
        mountpoint.touch()
        proc = factory("--blockdev", f"file,node-name=file0,filename={image},locking=off",
                       "--blockdev", f"file,node-name=ro,filename={image},read-only=on,locking=off")
        found[name] = [message.replace(str(tmp_path), "TMP").replace(f"mnt-{name}", "mnt")
                       for message in _errors(proc, mountpoint, tmp_path)]
        proc.qmp.command("block-export-del", id="exp0")
        proc.qmp.event_wait("BLOCK_EXPORT_DELETED", timeout=10)
        assert wait_unmounted(mountpoint)
    assert found["blockd"] == found["qsd"]
    assert found["blockd"][:3] == [
        "GenericError: 'TMP/dir' is not a regular file",
        "GenericError: Failed to stat 'TMP/missing': No such file or directory",
        "GenericError: There already is a FUSE export on 'TMP/mnt'",
    ]


def test_query_and_delete_while_a_process_holds_the_file(setup: Setup) -> None:
    proc = setup.start()
    setup.add(writable=True)
    exports = proc.qmp.command("query-block-exports")
    assert exports == [{"id": "exp0", "type": "fuse", "node-name": "file0", "shutting-down": False}]
    # Read-write: a read-only open may be served by the kernel alone (passthrough, see below).
    holder = os.open(setup.mountpoint, os.O_RDWR)
    try:
        assert os.pread(holder, 4096, 0) == setup.content[:4096]
        setup.delete()
        assert not is_mounted(setup.mountpoint)
        assert proc.qmp.command("query-block-exports") == []
        # The file underneath is back; the holder's descriptor lost its connection.
        assert os.stat(setup.mountpoint).st_size == 0
        with pytest.raises(OSError) as info:
            os.pread(holder, 4096, 0)
        assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    finally:
        try:
            os.close(holder)
        except OSError as error:  # closing reports the lost connection too
            assert error.errno == errno.ENOTCONN
    # The id and the mount point can be used again.
    setup.add()
    assert is_mounted(setup.mountpoint)


def test_delete_while_requests_are_in_flight(setup: Setup) -> None:
    proc = setup.start()
    setup.add(writable=True)
    busy = threading.Event()
    failures: list[int] = []

    def hammer(seed: int) -> None:
        fd = os.open(setup.mountpoint, os.O_RDWR)
        try:
            count = 0
            while True:
                offset = ((count * 7919 + seed * 104729) % 1024) * 4096
                try:
                    if count % 2:
                        os.pwrite(fd, b"w" * 4096, offset)
                    else:
                        os.pread(fd, 65536, offset % (4 * MiB - 65536))
                except OSError as error:
                    failures.append(error.errno)
                    return
                count += 1
                if count == 200:
                    busy.set()
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    assert busy.wait(30)
    setup.delete()
    for thread in threads:
        thread.join(30)
    # Every client lost its connection (requests cut off in flight get ECONNABORTED), and the
    # daemon carries on.
    assert len(failures) == len(threads)
    assert set(failures) <= {errno.ENOTCONN, errno.ECONNABORTED}
    assert not is_mounted(setup.mountpoint)
    assert proc.qmp.command("query-block-exports") == []
    setup.add()
    assert Path(setup.mountpoint).stat().st_size == 4 * MiB


@pytest.mark.parametrize("allow_other", ["off", "on", "auto"])
def test_allow_other(setup: Setup, allow_other: str) -> None:
    setup.start(export=f",allow-other={allow_other}")
    options = fuse_mounts()[str(setup.mountpoint)]
    if allow_other == "auto" and os.geteuid() != 0:
        pytest.skip("auto depends on user_allow_other in /etc/fuse.conf when not root")
    # Root may always use allow_other, so auto means on here.
    assert ("allow_other" in options) == (allow_other != "off")


# ---- Lifetime: the daemon never leaves its mount behind.


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "quit"])
def test_daemon_exit_unmounts(setup: Setup, how: str) -> None:
    proc = setup.start(export=",writable=on")
    assert is_mounted(setup.mountpoint)
    if how == "quit":
        assert proc.quit() == 0
    else:
        proc.send_signal(getattr(signal, how))
        assert proc.wait() == 0
    assert not is_mounted(setup.mountpoint)
    assert os.stat(setup.mountpoint).st_size == 0


def test_kill_9_leaves_no_stale_mount(setup: Setup) -> None:
    proc = setup.start(export=",writable=on")
    assert is_mounted(setup.mountpoint)
    proc.proc.kill()
    proc.wait()
    proc.expected_status = None
    # The export's watchdog process runs fusermount3 -u -z once the daemon is gone.
    if not wait_unmounted(setup.mountpoint, timeout=10):
        run("fusermount3", "-u", setup.mountpoint, check=False)
        pytest.fail("kill -9 left the FUSE mount behind (recovered with fusermount3 -u)")


# ---- Concurrency.


def test_concurrent_1m_direct_writers_and_readers(setup: Setup) -> None:
    """Whole-MiB O_DIRECT writes and reads (the export's largest request) from several threads at
    once: every byte lands where it was written and reads back."""
    setup.start(export=",writable=on")
    blocks = 4 * MiB // MiB
    rounds = 6
    errors: list[BaseException] = []
    final: dict[int, bytes] = {}
    lock = threading.Lock()

    def worker(index: int) -> None:
        try:
            fd = os.open(setup.mountpoint, os.O_RDWR | os.O_DIRECT)
            buffer = mmap_buffer(MiB)
            try:
                for round_ in range(rounds):
                    block = (index + round_) % blocks
                    data = os.urandom(MiB)
                    buffer[:] = data
                    # Threads write different blocks in each round; the barrier keeps rounds apart.
                    assert os.pwrite(fd, buffer, block * MiB) == MiB
                    assert os.preadv(fd, [buffer], block * MiB) == MiB
                    assert bytes(buffer) == data
                    with lock:
                        final[block] = data
                    barrier.wait(30)
            finally:
                os.close(fd)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            barrier.abort()

    barrier = threading.Barrier(blocks)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(blocks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    expected = b"".join(final[block] for block in range(blocks))
    assert setup.image.read_bytes() == expected


def mmap_buffer(size: int) -> Any:
    """A page-aligned writable buffer (O_DIRECT needs aligned memory)."""
    return mmap.mmap(-1, size)


# ---- Large requests: a lone 1 MiB READ reaches the node as 256 KiB pieces, all in flight.

PIECE = 256 * 1024


def _direct_pwrite(fd: int, data: bytes, offset: int) -> int:
    buffer = mmap_buffer(len(data))
    buffer[:] = data
    return os.pwrite(fd, buffer, offset)


def _direct_pread(fd: int, length: int, offset: int) -> bytes:
    buffer = mmap_buffer(length)
    got = os.preadv(fd, [buffer], offset)
    return bytes(buffer[:got])


def test_large_direct_requests_unaligned_and_across_the_end(setup: Setup) -> None:
    """O_DIRECT 1 MiB reads and writes on an O_DIRECT file node, at offsets that cut the pieces
    anywhere (and so through the node's bounce buffers), and across the end of the image: the
    data is where it belongs, and a write that runs past the end of a non-growable export writes
    up to the end."""
    # Sectors, as the node counts its size, but no multiple of a page or of a piece.
    size = 4 * MiB - 3 * PIECE + 1536
    setup = Setup(setup.image.parent, setup.daemon_factory, size=size)
    setup.start(export=",writable=on", file_options=",cache.direct=on")
    model = bytearray(setup.content)
    fd = os.open(setup.mountpoint, os.O_RDWR | os.O_DIRECT)
    try:
        for offset in (0, 12345, PIECE - 1, 2 * PIECE + 4096):
            data = os.urandom(MiB)
            assert _direct_pwrite(fd, data, offset) == MiB
            model[offset:offset + MiB] = data
            assert _direct_pread(fd, MiB, offset) == data
        assert _direct_pread(fd, MiB, 777) == model[777:777 + MiB]
        # Across the end: the read stops there, the write is cut there.
        tail = size - 300_000
        assert _direct_pread(fd, MiB, tail) == model[tail:]
        data = os.urandom(MiB)
        assert _direct_pwrite(fd, data, tail) == size - tail
        model[tail:] = data[:size - tail]
        with pytest.raises(OSError) as info:
            _direct_pwrite(fd, data, size)
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert setup.image.read_bytes() == model


def test_large_direct_writes_past_the_end_grow_the_node(setup: Setup) -> None:
    """Growable: O_DIRECT 1 MiB writes beyond and across the end grow the node once, to the end
    of the write; the gap reads as zeroes."""
    setup.start(export=",writable=on,growable=on", file_options=",cache.direct=on")
    model = bytearray(setup.content)
    fd = os.open(setup.mountpoint, os.O_RDWR | os.O_DIRECT)
    try:
        # Beyond the end, then across it; on sectors (the node's size counts whole sectors).
        for offset in (4 * MiB + 5120, 5 * MiB + 5120 - 102_400):
            data = os.urandom(MiB)
            assert _direct_pwrite(fd, data, offset) == MiB
            model[len(model):offset] = bytes(max(0, offset - len(model)))
            model[offset:offset + MiB] = data
            assert os.fstat(fd).st_size == len(model)
        assert _direct_pread(fd, 2 * MiB, 4 * MiB - 1000) == model[4 * MiB - 1000:]
    finally:
        os.close(fd)
    assert setup.image.read_bytes() == model


def test_a_failing_piece_fails_the_whole_request(setup: Setup) -> None:
    """An error in one piece of a 1 MiB read (blkdebug, in its third piece) is the request's
    error, with its errno, as is one in a write; requests that do not touch that sector succeed."""
    setup.start()
    bad_sector = (2 * PIECE + 8192) // 512
    setup.proc.qmp.command("blockdev-add", {
        "driver": "blkdebug", "node-name": "dbg", "image": "file0",
        "inject-error": [{"event": "read_aio", "errno": errno.EIO, "sector": bad_sector},
                         {"event": "write_aio", "errno": errno.ENOSPC, "sector": bad_sector}]})
    setup.add(node_name="dbg", writable=True)
    fd = os.open(setup.mountpoint, os.O_RDWR | os.O_DIRECT)
    try:
        assert _direct_pread(fd, MiB, 3 * PIECE) == setup.content[3 * PIECE:3 * PIECE + MiB]
        with pytest.raises(OSError) as info:
            _direct_pread(fd, MiB, 0)
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            _direct_pwrite(fd, os.urandom(MiB), 0)
        assert info.value.errno == errno.ENOSPC
        data = os.urandom(MiB)
        assert _direct_pwrite(fd, data, 3 * PIECE) == MiB
        assert _direct_pread(fd, MiB, 3 * PIECE) == data
    finally:
        os.close(fd)


@pytest.mark.skipif(shutil.which("nbdkit") is None, reason="nbdkit is missing (Debian package nbdkit)")
def test_concurrent_allocations_do_not_zero_fresh_writes(tmp_path: Path, daemon: Daemon) -> None:
    """fallocate(KEEP_SIZE) fills holes with zeroes while writes are held back. A second
    allocation that finishes first must not let writes through while the first is still filling:
    here the first one's zeroing is slowed down by nbdkit's delay filter, and a write into its
    range made after the second allocation returned must survive. KEEP_SIZE because older kernels
    take the inode lock only for fallocate modes that change the size; recent ones (6.18 here)
    hold it across every fallocate and so keep the other requests out themselves."""
    from blockd.testing.nbd_servers import nbdkit

    server = nbdkit(tmp_path / "k.sock", "--filter=delay", "memory", "16M", "delay-zero=1").start()
    mountpoint = tmp_path / "mnt"
    mountpoint.touch()
    try:
        daemon("--blockdev", f"nbd,node-name=nbd0,server.type=unix,server.path={server.sock},export=exp",
               "--export", f"fuse,id=exp0,node-name=nbd0,mountpoint={mountpoint},writable=on")
        fd = os.open(mountpoint, os.O_RDWR)
        try:
            os.pwrite(fd, b"d" * 4096, 0)  # data: allocating [0, 4 KiB) has no hole to fill
            slow_error: list[BaseException] = []

            def slow_allocation() -> None:
                try:
                    # A hole: zeroed, taking 1 s.
                    _fallocate(fd, FALLOC_FL_KEEP_SIZE, 8 * MiB, 8 * MiB)
                except BaseException as error:  # noqa: BLE001 - reported below
                    slow_error.append(error)

            slow = threading.Thread(target=slow_allocation)
            started = time.monotonic()
            slow.start()
            # No event tells when the export has sent the slow zeroing; it is well under way after
            # a third of its 1 s.
            time.sleep(0.3)
            _fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 4096)
            fresh = os.urandom(4096)
            assert os.pwrite(fd, fresh, 12 * MiB) == 4096
            slow.join(30)
            assert not slow_error, slow_error
            assert time.monotonic() - started >= 1
            assert os.pread(fd, 4096, 12 * MiB) == fresh
            assert os.pread(fd, 4096, 0) == b"d" * 4096
            assert os.pread(fd, 4096, 8 * MiB) == bytes(4096)
        finally:
            os.close(fd)
    finally:
        server.kill()


# ---- Passthrough: read-only opens that the kernel serves from the image itself.


def _passthrough_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "FUSE passthrough needs CAP_SYS_ADMIN (FUSE_DEV_IOC_BACKING_OPEN); run as root"
    release = tuple(int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
    if release < (6, 9):
        return f"FUSE passthrough needs Linux 6.9 or later (this is {os.uname().release})"
    try:
        import gzip

        with gzip.open("/proc/config.gz", "rt") as config:
            if "CONFIG_FUSE_PASSTHROUGH=y\n" not in config.read():
                return "this kernel is built without CONFIG_FUSE_PASSTHROUGH"
    except OSError:
        pass  # no /proc/config.gz: the version has to do
    return None


needs_passthrough = pytest.mark.skipif(_passthrough_unavailable() is not None,
                                       reason=str(_passthrough_unavailable()))


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Waits until every thread of `pid` has stopped (SIGSTOP takes effect asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as status:
                states.append(status.read().rsplit(")", 1)[1].split()[0])
        if all(state in "Tt" for state in states):
            return
        assert time.monotonic() < deadline, f"process {pid} did not stop: {states}"
        time.sleep(0.01)


def read_while_stopped(proc: Any, fd: int, length: int, offset: int, direct: bool = False,
                       wait: float = 0.5) -> bytes | None:
    """Stops the daemon (SIGSTOP) and reads: the data when the read completed while the daemon
    could not answer (the kernel served it from the image), None when it waited for the daemon
    (it is then let go on and the read finishes)."""
    done = threading.Event()
    result: list[Any] = []

    def read() -> None:
        try:
            result.append(_direct_pread(fd, length, offset) if direct else os.pread(fd, length, offset))
        except OSError as error:
            result.append(error)
        done.set()

    os.kill(proc.pid, signal.SIGSTOP)
    thread = threading.Thread(target=read)
    try:
        wait_stopped(proc.pid)
        thread.start()
        served = done.wait(wait)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        thread.join(30)
    assert result, "the read never finished"
    if isinstance(result[0], OSError):
        raise result[0]
    return result[0] if served else None


@needs_passthrough
@pytest.mark.parametrize("cache_direct", [False, True], ids=["page-cache", "cache-direct"])
@pytest.mark.parametrize("format", ["file", "raw"])
def test_passthrough_read_only_opens(setup: Setup, cache_direct: bool, format: str) -> None:
    """Read-only opens whose O_DIRECT matches the node's cache.direct are served by the kernel
    from the image (they read on while the daemon is stopped); writes through a read-write open
    beside them go through the daemon and are seen by the passthrough reader; opens that differ
    in O_DIRECT stay on the daemon's path."""
    node = "file0" if format == "file" else "fmt0"
    extra = ["--blockdev", "raw,node-name=fmt0,file=file0"] if format == "raw" else []
    proc = setup.start(*extra, file_options=",cache.direct=" + ("on" if cache_direct else "off"))
    setup.add(node_name=node, writable=True)
    matching = os.O_DIRECT if cache_direct else 0
    reader = os.open(setup.mountpoint, os.O_RDONLY | matching)
    other = os.open(setup.mountpoint, os.O_RDONLY | (os.O_DIRECT - matching))
    writer = os.open(setup.mountpoint, os.O_RDWR | os.O_DIRECT)
    try:
        assert read_while_stopped(proc, reader, MiB, MiB, direct=cache_direct) == \
            setup.content[MiB:2 * MiB]
        assert read_while_stopped(proc, other, 4096, 0, direct=not cache_direct) is None
        patch = os.urandom(MiB)
        assert _direct_pwrite(writer, patch, MiB) == MiB
        assert read_while_stopped(proc, reader, MiB, MiB, direct=cache_direct) == patch
        if cache_direct:
            # The kernel reads the image with O_DIRECT, and its alignment rules apply.
            with pytest.raises(OSError) as info:
                os.pread(reader, 100, 1)
            assert info.value.errno == errno.EINVAL
        else:
            assert os.pread(reader, 100, MiB + 1) == patch[1:101]
        # mmap maps the image itself, on every open of such an export (shared mappings too).
        with mmap.mmap(other, MiB, mmap.MAP_SHARED, mmap.PROT_READ, offset=MiB) as mapping:
            assert mapping[:] == patch
        # The attributes are still the export's.
        assert stat.S_IMODE(os.fstat(reader).st_mode) == 0o600
        assert os.fstat(reader).st_size == 4 * MiB
    finally:
        for fd in (reader, other, writer):
            os.close(fd)
    assert setup.image.read_bytes()[MiB:2 * MiB] == patch


@needs_passthrough
@pytest.mark.parametrize("kind", ["qcow2", "raw-offset", "blkdebug", "odd-size"])
def test_passthrough_not_taken_where_it_would_differ(tmp_path: Path, daemon: Daemon, kind: str) -> None:
    """A node whose bytes are not the image file's as they are (qcow2, raw with an offset, a
    filter, a file whose length is no whole number of sectors) is read through the daemon."""
    size = 4 * MiB if kind != "odd-size" else 4 * MiB - 100
    setup = Setup(tmp_path, daemon, size=size)
    expected = setup.content if kind != "odd-size" else setup.content + bytes(100)
    extra: list[str] = []
    node = "file0"
    if kind == "qcow2":
        if shutil.which("qemu-img") is None:
            pytest.skip("qemu-img is missing (Debian package qemu-utils)")
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", setup.image, tmp_path / "disk.qcow2")
        setup.image = tmp_path / "disk.qcow2"
        extra, node = ["--blockdev", "qcow2,node-name=fmt0,file=file0"], "fmt0"
    elif kind == "raw-offset":
        extra, node = ["--blockdev", "raw,node-name=fmt0,file=file0,offset=512"], "fmt0"
        expected = setup.content[512:]
    elif kind == "blkdebug":
        extra, node = ["--blockdev", "blkdebug,node-name=fmt0,image=file0"], "fmt0"
    proc = setup.start(*extra)
    setup.add(node_name=node)
    fd = os.open(setup.mountpoint, os.O_RDONLY)
    try:
        assert read_while_stopped(proc, fd, 4096, 0) is None
        assert os.pread(fd, 2 * MiB, 0) == expected[:2 * MiB]
        assert os.pread(fd, MiB, len(expected) - 1000) == expected[-1000:]
    finally:
        os.close(fd)


@needs_passthrough
def test_passthrough_open_outlives_export_del(setup: Setup) -> None:
    """The documented caveat: block-export-del unmounts, but a file opened in passthrough mode
    goes on reading the image (a file opened otherwise loses its connection)."""
    proc = setup.start()
    setup.add(writable=True)
    passthrough = os.open(setup.mountpoint, os.O_RDONLY)
    ordinary = os.open(setup.mountpoint, os.O_RDWR)
    try:
        assert read_while_stopped(proc, passthrough, 4096, 0) == setup.content[:4096]
        setup.delete()
        assert not is_mounted(setup.mountpoint)
        with pytest.raises(OSError) as info:
            os.pread(ordinary, 4096, 0)
        assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
        changed = os.urandom(4096)
        with open(setup.image, "r+b") as image:
            image.write(changed)
        assert os.pread(passthrough, 4096, 0) == changed
    finally:
        for fd in (passthrough, ordinary):
            try:
                os.close(fd)
            except OSError as error:  # closing reports the lost connection (FLUSH)
                assert error.errno == errno.ENOTCONN
    # The export comes back, with passthrough again.
    setup.add()
    fd = os.open(setup.mountpoint, os.O_RDONLY)
    try:
        assert read_while_stopped(proc, fd, 4096, 0) == changed
    finally:
        os.close(fd)
