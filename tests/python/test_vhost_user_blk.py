"""The vhost-user-blk export under a real guest: QEMU's vhost-user-blk-pci device and a Linux
guest's virtio_blk driver use the export as /dev/vda (see ``blockd.testing.guest``).

Each test boots one guest (several seconds under TCG), so every boot runs many checks: the
script prints ``name=value`` lines, and the test compares them with what the host knows. Data
written by the guest is checked on the host after the server has exited, on the image file
itself (and with ``qemu-img check`` / ``qemu-img compare`` for qcow2). Every test runs against
qemu-storage-daemon 7.2, the reference, and against blockd.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockd.errors import ExecuteError
from blockd.testing.guest import GuestResult, guest_or_skip, run_guest
from blockd.testing.process import tool_env

KiB = 1 << 10
MiB = 1 << 20


class Server:
    """The daemon under test: ``name`` is "qsd" or "blockd", ``start(*options)`` starts it."""

    def __init__(self, name: str, start: Callable[..., Any]) -> None:
        self.name = name
        self.start = start


@pytest.fixture(params=["qsd", "blockd"])
def server(request: pytest.FixtureRequest) -> Server:
    # The guest first: when it cannot be had, the test skips before any daemon starts.
    guest_or_skip()
    return Server(request.param, request.getfixturevalue("qsd" if request.param == "qsd" else "daemon"))


def add_export(proc: Any, node: str, sock: Path, *, writable: bool, num_queues: int = 1,
               logical_block_size: int | None = None) -> None:
    """block-export-add of a vhost-user-blk export; skips while blockd does not have the type."""
    arguments: dict[str, Any] = {
        "type": "vhost-user-blk", "id": "vu0", "node-name": node, "writable": writable,
        "addr": {"type": "unix", "path": str(sock)}, "num-queues": num_queues,
    }
    if logical_block_size is not None:
        arguments["logical-block-size"] = logical_block_size
    try:
        proc.qmp.command("block-export-add", arguments)
    except ExecuteError as error:
        if "not supported by blockd yet" in error.desc:
            pytest.skip(f"blockd: {error.desc}")
        raise


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, env=tool_env(), timeout=120)


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


class GuestScript:
    """A guest shell script built step by step, with the disk content the host expects after it.

    Reads print ``name=<sha256>`` of what the guest reads with O_DIRECT; the test compares them
    with ``expected_reads``. Writes copy files added to the guest with dd (O_DIRECT) and update
    ``disk``.
    """

    def __init__(self, disk: bytearray) -> None:
        self.disk = disk
        self.lines = ["fail=0"]
        self.files: dict[str, bytes] = {}
        self.expected_reads: dict[str, str] = {}

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def read(self, name: str, offset: int, length: int, block: int = 64 * KiB) -> None:
        self.expected_reads[name] = digest(self.disk[offset:offset + length])
        self.add(f"echo {name}=$(dd if=/dev/vda bs={block} skip={offset} count={length} "
                 "iflag=direct,skip_bytes,count_bytes 2>/dev/null | sha256sum | cut -d' ' -f1)")

    def write_command(self, name: str, offset: int, data: bytes, block: int | None = None) -> str:
        """The dd command writing `data` at `offset` (the disk content is updated here)."""
        path = f"/data/{name}"
        self.files[path] = data
        self.disk[offset:offset + len(data)] = data
        block = block or len(data)
        return (f"dd if={path} of=/dev/vda bs={block} seek={offset} oflag=direct,seek_bytes "
                "conv=notrunc 2>/dev/null")

    def write(self, name: str, offset: int, data: bytes, block: int | None = None) -> None:
        self.add(f"{self.write_command(name, offset, data, block)} || {{ echo {name}-failed; fail=1; }}")

    def text(self) -> str:
        return "\n".join(self.lines + ["exit $fail", ""])


def check_reads(result: GuestResult, script: GuestScript) -> None:
    values = result.values()
    wrong = [name for name, expected in script.expected_reads.items() if values.get(name) != expected]
    assert not wrong, f"guest read other data than expected in {wrong}\n{result}"


def sysfs_lines() -> list[str]:
    """Script lines printing what the guest kernel sees of /dev/vda."""
    return [
        "q=/sys/block/vda/queue",
        "echo sectors=$(cat /sys/block/vda/size)",
        "echo size64=$(blockdev --getsize64 /dev/vda)",
        "echo logical_block_size=$(cat $q/logical_block_size)",
        "echo ro=$(cat /sys/block/vda/ro)",
        "echo getro=$(blockdev --getro /dev/vda)",
        "echo queues=$(ls /sys/block/vda/mq | wc -l)",
        "echo discard_max_bytes=$(cat $q/discard_max_bytes)",
        "echo write_zeroes_max_bytes=$(cat $q/write_zeroes_max_bytes)",
        "echo write_cache=$(cat $q/write_cache | tr ' ' _)",
    ]


# ---- A writable qcow2 image, two queues, 4 KiB logical blocks.


@pytest.fixture
def qcow2_disk(tmp_path: Path) -> tuple[Path, bytearray]:
    """A 32 MiB qcow2 image with patterned data in places, and its content."""
    disk = bytearray(32 * MiB)
    for offset, length in ((0, MiB), (8 * MiB, MiB), (20 * MiB, MiB), (24 * MiB, 512 * KiB)):
        disk[offset:offset + length] = os.urandom(length)
    raw = tmp_path / "initial.raw"
    raw.write_bytes(disk)
    image = tmp_path / "disk.qcow2"
    result = qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    assert result.returncode == 0, result.stderr
    return image, disk


def test_writable_qcow2_two_queues(server: Server, qcow2_disk: tuple[Path, bytearray], tmp_path: Path) -> None:
    image, disk = qcow2_disk
    proc = server.start("--blockdev", f"file,node-name=file0,filename={image},discard=unmap",
                        "--blockdev", "qcow2,node-name=fmt0,file=file0,discard=unmap")
    sock = tmp_path / "vhost.sock"
    add_export(proc, "fmt0", sock, writable=True, num_queues=2, logical_block_size=4096)

    script = GuestScript(disk)
    script.add(*sysfs_lines())
    # Reads of what the host wrote: a whole data area, one across its end into unallocated
    # clusters, and a small one inside a cluster.
    script.read("read_head", 0, MiB)
    script.read("read_edge", MiB - 12 * KiB, 76 * KiB, block=4 * KiB)
    script.read("read_small", 8 * MiB + 4 * KiB, 12 * KiB, block=4 * KiB)
    # Writes of several sizes and places: one logical block, across cluster boundaries, into
    # unallocated space, the last block of the disk, and a large one in small and large requests.
    script.write("w_one", 4 * KiB, os.urandom(4 * KiB))
    script.write("w_across", 64 * KiB - 4 * KiB, os.urandom(72 * KiB))
    script.write("w_hole", 5 * MiB + 4 * KiB, os.urandom(20 * KiB))
    script.write("w_last", 32 * MiB - 4 * KiB, os.urandom(4 * KiB))
    script.write("w_large", 12 * MiB - 8 * KiB, os.urandom(MiB + 12 * KiB))
    script.write("w_small_requests", 10 * MiB + 4 * KiB, os.urandom(256 * KiB), block=4 * KiB)
    # A concurrent batch: eight writers at once, spread over both queues.
    batch = [script.write_command(f"c{index}", 16 * MiB + index * 96 * KiB, os.urandom(64 * KiB))
             for index in range(8)]
    script.add("pids=", *[f'{command} & pids="$pids $!"' for command in batch],
               "for pid in $pids; do wait $pid || { echo batch-failed; fail=1; }; done")
    # Write zeroes over data: util-linux's blkdiscard -z (BLKZEROOUT); busybox's has no -z.
    zeroes = (24 * MiB + 4 * KiB, 200 * KiB)
    script.add(f"/usr/local/sbin/blkdiscard -z -o {zeroes[0]} -l {zeroes[1]} /dev/vda "
               "|| { echo zeroes-failed; fail=1; }")
    script.disk[zeroes[0]:zeroes[0] + zeroes[1]] = bytes(zeroes[1])
    # Discard of whole clusters of data, when the device offers discard; the nodes unmap, so the
    # clusters read back as zeroes.
    discarded = (20 * MiB, MiB)
    script.add(f"if [ $(cat $q/discard_max_bytes) -gt 0 ]; then blkdiscard -o {discarded[0]} "
               f"-l {discarded[1]} /dev/vda || {{ echo discard-failed; fail=1; }}; fi")
    script.add("sync")
    # Everything the guest wrote, read back with O_DIRECT (the discarded range apart).
    script.read("after_head", 0, 2 * MiB)
    script.read("after_hole", 5 * MiB, MiB)
    script.read("after_middle", 10 * MiB, 4 * MiB)
    script.read("after_batch", 16 * MiB, MiB)
    script.read("after_zeroes", 24 * MiB, 512 * KiB)
    script.read("after_tail", 31 * MiB, MiB)
    script.add(f"echo after_discard=$(dd if=/dev/vda bs={MiB} skip={discarded[0] // MiB} count=1 iflag=direct "
               "2>/dev/null | sha256sum | cut -d' ' -f1)")

    result = run_guest(sock, script.text(), num_queues=2, files=script.files)
    assert result.status == 0, result
    values = result.values()
    assert values["sectors"] == str(32 * MiB // 512), result
    assert values["size64"] == str(32 * MiB), result
    assert values["logical_block_size"] == "4096", result
    assert values["ro"] == "0" and values["getro"] == "0", result
    assert values["queues"] == "2", result
    discard = int(values["discard_max_bytes"]) > 0
    if server.name == "qsd":
        # The reference offers discard and write zeroes on a writable export.
        assert discard and int(values["write_zeroes_max_bytes"]) > 0, result
    check_reads(result, script)
    if discard:
        disk[discarded[0]:discarded[0] + discarded[1]] = bytes(discarded[1])
    assert values["after_discard"] == digest(disk[discarded[0]:discarded[0] + discarded[1]]), result
    assert "I/O error" not in result.kernel_log, result.kernel_log

    # On the host, once the server has exited: the image is consistent and holds what the guest
    # wrote.
    assert proc.stop() == 0, proc.stderr
    check = qemu_img("check", "-f", "qcow2", str(image))
    assert check.returncode == 0, check.stdout + check.stderr
    expected = tmp_path / "expected.raw"
    expected.write_bytes(disk)
    compare = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(image), str(expected))
    assert compare.returncode == 0, compare.stdout + compare.stderr
    if discard:
        # The discarded clusters hold no data any more.
        mapped = qemu_img("map", "--output=json", "-f", "qcow2", str(image))
        assert mapped.returncode == 0, mapped.stderr
        assert not any(entry["data"] and entry["start"] < discarded[0] + discarded[1]
                       and entry["start"] + entry["length"] > discarded[0]
                       for entry in json.loads(mapped.stdout)), mapped.stdout


# ---- A read-only raw image, one queue, the default 512-byte logical blocks.


def test_read_only_raw(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    content = os.urandom(8 * MiB + 3 * 512)  # not a multiple of 4 KiB
    image.write_bytes(content)
    proc = server.start("--blockdev", f"file,node-name=file0,filename={image}")
    sock = tmp_path / "vhost.sock"
    add_export(proc, "file0", sock, writable=False)

    script = GuestScript(bytearray(content))
    script.add(*sysfs_lines())
    script.read("read_all", 0, len(content))
    script.read("read_sectors", 7 * 512, 3 * 512, block=512)
    script.read("read_tail", 8 * MiB - 512, 4 * 512, block=512)
    # Every way of changing the disk must fail, and leave it as it was.
    data = os.urandom(4 * KiB)
    script.files["/data/w"] = data
    script.add(
        "dd if=/data/w of=/dev/vda bs=4096 seek=1 oflag=direct conv=notrunc 2>/dev/null; echo dd_write=$?",
        "dd if=/data/w of=/dev/vda bs=4096 seek=2 conv=notrunc,fsync 2>/dev/null; echo buffered_write=$?",
        "blkdiscard -o 0 -l 65536 /dev/vda 2>/dev/null; echo discard=$?",
        "/usr/local/sbin/blkdiscard -z -o 0 -l 65536 /dev/vda 2>/dev/null; echo zeroes=$?",
    )
    script.read("read_after", 0, len(content))

    result = run_guest(sock, script.text(), files=script.files)
    assert result.status == 0, result
    values = result.values()
    assert values["sectors"] == str(len(content) // 512), result
    assert values["size64"] == str(len(content)), result
    assert values["logical_block_size"] == "512", result
    assert values["ro"] == "1" and values["getro"] == "1", result
    assert values["queues"] == "1", result
    for attempt in ("dd_write", "buffered_write", "discard", "zeroes"):
        assert values[attempt] != "0", f"{attempt} succeeded on a read-only disk\n{result}"
    check_reads(result, script)

    assert proc.stop() == 0, proc.stderr
    assert image.read_bytes() == content
