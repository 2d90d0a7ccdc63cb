"""The vhost-user-blk export under a real guest: QEMU's vhost-user-blk-pci device and a Linux
guest's virtio_blk driver use the exports as /dev/vda, vdb and vdc (see ``blockd.testing.guest``).

A boot costs several seconds under TCG, so one guest with three disks runs most checks (a second
guest only reconnects and reads back): the script prints ``name=value`` lines, and the test
compares them with what the host knows. Data written by the guest is checked on the host after
the server has exited, on the image files themselves (and with ``qemu-img check`` / ``qemu-img
compare`` for qcow2). The test runs against qemu-storage-daemon 7.2, the reference, and against
blockd.
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
from blockd.testing.guest import GuestFailed, GuestResult, guest_or_skip, run_guest
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
    """block-export-add of a vhost-user-blk export of `node` (its id is the node's name); skips
    while blockd does not have the type."""
    arguments: dict[str, Any] = {
        "type": "vhost-user-blk", "id": node, "node-name": node, "writable": writable,
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
    return hashlib.md5(data).hexdigest()


class GuestScript:
    """A guest shell script built step by step; the script exits non-zero when a step that must
    work fails, and ``files`` go into the guest for it."""

    def __init__(self) -> None:
        self.lines = ["fail=0"]
        self.files: dict[str, bytes] = {}

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def text(self) -> str:
        return "\n".join(self.lines + ["exit $fail", ""])


class Disk:
    """One guest disk (``/dev/<name>``) and the content the host expects on it.

    Reads print ``<name>.<what>=<sha256>`` of what the guest reads with O_DIRECT, and remember
    the digest the content has at that point of the script; writes copy a file added to the
    guest with dd (O_DIRECT) and update ``content``.
    """

    def __init__(self, script: GuestScript, name: str, content: bytearray) -> None:
        self.script = script
        self.name = name
        self.dev = f"/dev/{name}"
        self.content = content
        self.expected_reads: dict[str, str] = {}

    def read_command(self, offset: int, length: int, block: int = 64 * KiB) -> str:
        return (f"dd if={self.dev} bs={block} skip={offset} count={length} iflag=direct,skip_bytes,count_bytes "
                "2>/dev/null | md5sum | cut -d' ' -f1")

    def read(self, what: str, offset: int, length: int, block: int = 64 * KiB) -> None:
        self.expected_reads[f"{self.name}.{what}"] = digest(self.content[offset:offset + length])
        self.script.add(f"echo {self.name}.{what}=$({self.read_command(offset, length, block)})")

    def write_command(self, what: str, offset: int, data: bytes, block: int | None = None,
                      sync: bool = False) -> str:
        """The dd command writing `data` at `offset` (the expected content is updated here)."""
        path = f"/data/{self.name}.{what}"
        self.script.files[path] = data
        self.content[offset:offset + len(data)] = data
        conv = "notrunc,fsync" if sync else "notrunc"
        return (f"dd if={path} of={self.dev} bs={block or len(data)} seek={offset} oflag=direct,seek_bytes "
                f"conv={conv} 2>/dev/null")

    def write(self, what: str, offset: int, data: bytes, block: int | None = None, sync: bool = False) -> None:
        command = self.write_command(what, offset, data, block, sync)
        self.script.add(f"{command} || {{ echo {self.name}.{what}-failed; fail=1; }}")

    def sysfs(self) -> None:
        """Prints what the guest kernel sees of the disk."""
        sys_dir, queue = f"/sys/block/{self.name}", f"/sys/block/{self.name}/queue"
        for what, command in (
            ("sectors", f"cat {sys_dir}/size"),
            ("size64", f"blockdev --getsize64 {self.dev}"),
            ("logical_block_size", f"cat {queue}/logical_block_size"),
            ("ro", f"cat {sys_dir}/ro"),
            ("getro", f"blockdev --getro {self.dev}"),
            ("queues", f"ls {sys_dir}/mq | wc -l"),
            ("discard_max_bytes", f"cat {queue}/discard_max_bytes"),
            ("write_zeroes_max_bytes", f"cat {queue}/write_zeroes_max_bytes"),
            ("features", f"cat {sys_dir}/device/features"),
        ):
            self.script.add(f"echo {self.name}.{what}=$({command})")

    def values(self, result: GuestResult) -> dict[str, str]:
        """This disk's ``name=value`` lines of the output, without the disk's prefix."""
        prefix = self.name + "."
        return {key.removeprefix(prefix): value for key, value in result.values().items() if key.startswith(prefix)}

    def check_reads(self, result: GuestResult) -> None:
        values = result.values()
        wrong = [name for name, expected in self.expected_reads.items() if values.get(name) != expected]
        assert not wrong, f"the guest read other data than expected in {wrong}\n{result}"


# virtio-blk feature bits (virtio spec 1.2, 5.2.3), as the guest lists them in .../features.
F_RO, F_BLK_SIZE, F_FLUSH, F_CONFIG_WCE, F_MQ, F_DISCARD, F_WRITE_ZEROES = 5, 6, 9, 11, 12, 13, 14


def features(values: dict[str, str]) -> set[int]:
    return {bit for bit, flag in enumerate(values["features"]) if flag == "1"}


def make_qcow2(path: Path, content: bytes) -> Path:
    raw = path.with_suffix(".raw")
    raw.write_bytes(content)
    result = qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    assert result.returncode == 0, result.stderr
    raw.unlink()
    return path


def random_data(length: int) -> bytearray:
    """Random bytes, except that sector 0 has no MBR signature (the guest must see no partitions)."""
    data = bytearray(os.urandom(length))
    data[510:512] = bytes(2)
    return data


def test_guest_on_three_exports(server: Server, tmp_path: Path) -> None:
    """One guest, three disks: /dev/vda a writable qcow2 export with two queues and 4 KiB logical
    blocks, /dev/vdb a read-only raw export with one queue and 512-byte blocks, /dev/vdc a raw
    image under blkdebug that fails reads and writes in one place each."""
    # The host's data: random areas in a qcow2 image, whole raw images of random bytes (vdb's
    # size is not a multiple of 4 KiB).
    qcow2_content = bytearray(32 * MiB)
    for offset, length in ((0, MiB), (8 * MiB, MiB), (20 * MiB, MiB), (24 * MiB, 512 * KiB)):
        qcow2_content[offset:offset + length] = random_data(length)
    qcow2 = make_qcow2(tmp_path / "disk.qcow2", qcow2_content)
    raw = tmp_path / "disk.raw"
    raw_content = bytes(random_data(8 * MiB + 3 * 512))
    raw.write_bytes(raw_content)
    faulty = tmp_path / "faulty.raw"
    faulty.write_bytes(random_data(4 * MiB))

    proc = server.start("--blockdev", f"file,node-name=file0,filename={qcow2},discard=unmap",
                        "--blockdev", "qcow2,node-name=fmt0,file=file0,discard=unmap",
                        "--blockdev", f"file,node-name=file1,filename={raw}")
    bad_read, bad_write = MiB, 2 * MiB
    # raw over blkdebug: the raw driver's reads and writes raise the read_aio and write_aio events.
    proc.qmp.command("blockdev-add", {
        "driver": "raw", "node-name": "fmt2",
        "file": {
            "driver": "blkdebug", "node-name": "debug2",
            "image": {"driver": "file", "node-name": "file2", "filename": str(faulty)},
            "inject-error": [{"event": "read_aio", "errno": 5, "sector": bad_read // 512},
                             {"event": "write_aio", "errno": 5, "sector": bad_write // 512}],
        },
    })
    sockets = [tmp_path / "vda.sock", tmp_path / "vdb.sock", tmp_path / "vdc.sock"]
    add_export(proc, "fmt0", sockets[0], writable=True, num_queues=2, logical_block_size=4096)
    add_export(proc, "file1", sockets[1], writable=False)
    add_export(proc, "fmt2", sockets[2], writable=True)

    script = GuestScript()
    vda = Disk(script, "vda", qcow2_content)
    vdb = Disk(script, "vdb", bytearray(raw_content))
    vdc = Disk(script, "vdc", bytearray(faulty.read_bytes()))
    vda.sysfs()
    vdb.sysfs()

    # vda. With the cache in write-back mode (the device offers CONFIG_WCE) the guest sends flushes.
    script.add("if [ -w /sys/block/vda/cache_type ]; then echo 'write back' > /sys/block/vda/cache_type; fi",
               "echo vda.cache_type=$(cat /sys/block/vda/cache_type | tr ' ' _)")
    # Reads of what the host wrote: a whole data area, one across its end into unallocated
    # clusters, and a small one inside a cluster.
    vda.read("read_head", 0, MiB)
    vda.read("read_edge", MiB - 12 * KiB, 76 * KiB, block=4 * KiB)
    vda.read("read_small", 8 * MiB + 4 * KiB, 12 * KiB, block=4 * KiB)
    # Writes of several sizes and places: one logical block, across cluster boundaries, into
    # unallocated space, the last block of the disk (with fsync), and large ones in one request
    # and in many small ones.
    vda.write("w_one", 4 * KiB, os.urandom(4 * KiB))
    vda.write("w_across", 64 * KiB - 4 * KiB, os.urandom(72 * KiB))
    vda.write("w_hole", 5 * MiB + 4 * KiB, os.urandom(20 * KiB))
    vda.write("w_last", 32 * MiB - 4 * KiB, os.urandom(4 * KiB), sync=True)
    vda.write("w_large", 12 * MiB - 8 * KiB, os.urandom(MiB + 12 * KiB))
    vda.write("w_small_requests", 10 * MiB + 4 * KiB, os.urandom(256 * KiB), block=4 * KiB)
    # A concurrent batch: eight writers at once, spread over both queues.
    batch = [vda.write_command(f"c{index}", 16 * MiB + index * 96 * KiB, os.urandom(64 * KiB)) for index in range(8)]
    script.add("pids=", *[f'{command} & pids="$pids $!"' for command in batch],
               "for pid in $pids; do wait $pid || { echo vda.batch-failed; fail=1; }; done")
    # Write zeroes over data: util-linux's blkdiscard -z (BLKZEROOUT); busybox's has no -z.
    zeroes = (24 * MiB + 4 * KiB, 200 * KiB)
    script.add(f"/usr/local/sbin/blkdiscard -z -o {zeroes[0]} -l {zeroes[1]} /dev/vda "
               "|| { echo vda.zeroes-failed; fail=1; }")
    vda.content[zeroes[0]:zeroes[0] + zeroes[1]] = bytes(zeroes[1])
    # Discard of whole clusters of data when the device offers discard; the nodes unmap, so the
    # clusters read back as zeroes.
    discarded = (20 * MiB, MiB)
    script.add(f"if [ $(cat /sys/block/vda/queue/discard_max_bytes) -gt 0 ]; then blkdiscard -o {discarded[0]} "
               f"-l {discarded[1]} /dev/vda || {{ echo vda.discard-failed; fail=1; }}; fi")
    script.add("sync", "echo vda.flushes=$(awk '{print $16}' /sys/block/vda/stat)")
    # The guest driver lets the device go and takes it again, as on a guest reboot: the virtio
    # device is reset, and the front-end stops the export's queues and sets them up anew.
    script.add("virtio=$(basename $(readlink /sys/block/vda/device))",
               "echo $virtio > /sys/bus/virtio/drivers/virtio_blk/unbind",
               "[ ! -e /sys/block/vda ] || { echo vda.unbind-failed; fail=1; }",
               "echo $virtio > /sys/bus/virtio/drivers/virtio_blk/bind",
               "waited=0; while [ ! -b /dev/vda ] && [ $waited -lt 100 ]; do sleep 0.1; waited=$((waited + 1)); done",
               "echo vda.queues_after_reset=$(ls /sys/block/vda/mq | wc -l)")
    # Everything the guest wrote, read back with O_DIRECT (the discarded range apart).
    vda.read("after_head", 0, 2 * MiB)
    vda.read("after_hole", 5 * MiB, MiB)
    vda.read("after_middle", 10 * MiB, 4 * MiB)
    vda.read("after_batch", 16 * MiB, MiB)
    vda.read("after_zeroes", 24 * MiB, 512 * KiB)
    vda.read("after_tail", 31 * MiB, MiB)
    script.add(f"echo vda.after_discard=$({vda.read_command(*discarded)})")

    # vdb: reads, then every way of changing the disk fails and leaves it as it was.
    vdb.read("read_all", 0, len(raw_content))
    vdb.read("read_sectors", 7 * 512, 3 * 512, block=512)
    vdb.read("read_tail", 8 * MiB - 512, 4 * 512, block=512)
    script.files["/data/vdb.w"] = os.urandom(4 * KiB)
    script.add(
        "dd if=/data/vdb.w of=/dev/vdb bs=4096 seek=1 oflag=direct conv=notrunc 2>/dev/null; echo vdb.dd_write=$?",
        "dd if=/data/vdb.w of=/dev/vdb bs=4096 seek=2 conv=notrunc,fsync 2>/dev/null; echo vdb.buffered_write=$?",
        "blkdiscard -o 0 -l 65536 /dev/vdb 2>/dev/null; echo vdb.discard=$?",
        "/usr/local/sbin/blkdiscard -z -o 0 -l 65536 /dev/vdb 2>/dev/null; echo vdb.zeroes=$?",
    )
    vdb.read("read_after", 0, len(raw_content))

    # vdc: the failing read and write fail in the guest, the rest of the disk works.
    script.files["/data/vdc.w"] = os.urandom(4 * KiB)
    script.add(f"dd if=/dev/vdc of=/dev/null bs=4096 skip={bad_read // 4096} count=1 iflag=direct 2>/dev/null; "
               "echo vdc.bad_read=$?",
               f"dd if=/data/vdc.w of=/dev/vdc bs=4096 seek={bad_write // 4096} oflag=direct conv=notrunc 2>/dev/null; "
               "echo vdc.bad_write=$?")
    vdc.read("good_read", bad_read - 64 * KiB, 64 * KiB)
    vdc.write("good_write", 3 * MiB, os.urandom(64 * KiB))
    vdc.read("after", 3 * MiB - 4 * KiB, 72 * KiB)

    result = run_guest(sockets, script.text(), num_queues=[2, 1, 1], files=script.files)
    assert result.status == 0, str(result)

    values = vda.values(result)
    assert values["sectors"] == str(32 * MiB // 512), str(result)
    assert values["size64"] == str(32 * MiB), str(result)
    assert values["logical_block_size"] == "4096", str(result)
    assert values["ro"] == "0" and values["getro"] == "0", str(result)
    assert values["queues"] == "2" and values["queues_after_reset"] == "2", str(result)
    offered = features(values)
    assert {F_BLK_SIZE, F_FLUSH, F_MQ} <= offered and F_RO not in offered, str(result)
    if F_CONFIG_WCE in offered:
        # The fsync and sync above became flush requests, and they succeeded.
        assert values["cache_type"] == "write_back" and int(values["flushes"]) > 0, str(result)
    discard = int(values["discard_max_bytes"]) > 0
    if server.name == "qsd":
        # The reference offers discard and write zeroes on a writable export.
        assert discard and int(values["write_zeroes_max_bytes"]) > 0, str(result)
    vda.check_reads(result)
    if discard:
        vda.content[discarded[0]:discarded[0] + discarded[1]] = bytes(discarded[1])
    assert values["after_discard"] == digest(vda.content[discarded[0]:discarded[0] + discarded[1]]), str(result)

    values = vdb.values(result)
    assert values["sectors"] == str(len(raw_content) // 512), str(result)
    assert values["size64"] == str(len(raw_content)), str(result)
    assert values["logical_block_size"] == "512", str(result)
    assert values["ro"] == "1" and values["getro"] == "1", str(result)
    assert values["queues"] == "1", str(result)
    assert F_RO in features(values), str(result)
    for attempt in ("dd_write", "buffered_write", "discard", "zeroes"):
        assert values[attempt] != "0", f"{attempt} succeeded on a read-only disk\n{result}"
    vdb.check_reads(result)

    values = vdc.values(result)
    assert values["bad_read"] != "0" and values["bad_write"] != "0", str(result)
    vdc.check_reads(result)
    # vdc's are the only I/O errors the guest may have seen.
    assert not [line for line in result.kernel_log.splitlines() if "I/O error" in line and "vdc" not in line], \
        result.kernel_log

    # A second guest on the qcow2 export once the first has gone: the export takes a new
    # front-end, here with one of the two queues it offers, and serves what the first wrote.
    again = GuestScript()
    vda = Disk(again, "vda", vda.content)
    again.add("echo vda.queues=$(ls /sys/block/vda/mq | wc -l)")
    for what, offset, length in (("head", 0, 2 * MiB), ("hole", 5 * MiB, MiB), ("middle", 10 * MiB, 4 * MiB),
                                 ("batch_discard", 16 * MiB, 5 * MiB), ("zeroes", 24 * MiB, 512 * KiB),
                                 ("tail", 31 * MiB, MiB)):
        vda.read(what, offset, length)
    result = run_guest(sockets[0], again.text(), num_queues=1)
    assert result.status == 0, str(result)
    assert vda.values(result)["queues"] == "1", str(result)
    vda.check_reads(result)

    # On the host, once the server has exited: the qcow2 image is consistent and holds what the
    # guest wrote; the raw image is unchanged.
    assert proc.stop() == 0, proc.stderr
    check = qemu_img("check", "-f", "qcow2", str(qcow2))
    assert check.returncode == 0, check.stdout + check.stderr
    expected = tmp_path / "expected.raw"
    expected.write_bytes(vda.content)
    compare = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(qcow2), str(expected))
    assert compare.returncode == 0, compare.stdout + compare.stderr
    if discard:
        # The discarded clusters hold no data any more.
        mapped = qemu_img("map", "--output=json", "-f", "qcow2", str(qcow2))
        assert mapped.returncode == 0, mapped.stderr
        assert not any(entry["data"] and entry["start"] < discarded[0] + discarded[1]
                       and entry["start"] + entry["length"] > discarded[0]
                       for entry in json.loads(mapped.stdout)), mapped.stdout
    assert raw.read_bytes() == raw_content
    assert faulty.read_bytes()[3 * MiB:3 * MiB + 64 * KiB] == vdc.content[3 * MiB:3 * MiB + 64 * KiB]


def test_front_end_wanting_more_queues_than_offered(server: Server, tmp_path: Path) -> None:
    """A device with more queues than the export offers is refused by QEMU itself (the export
    tells its queue count), before the guest boots; the export carries on."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(MiB))
    proc = server.start("--blockdev", f"file,node-name=file0,filename={image}")
    sock = tmp_path / "vhost.sock"
    add_export(proc, "file0", sock, writable=True, num_queues=1)
    with pytest.raises(GuestFailed, match="maximum number of queues supported by the backend is 1"):
        run_guest(sock, "true", num_queues=2, timeout=60)
    exports = proc.qmp.command("query-block-exports")
    assert [(export["id"], export["type"]) for export in exports] == [("file0", "vhost-user-blk")], exports
