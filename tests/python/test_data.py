"""Data through blockd, checked independently: the image file on disk, qemu-io, libnbd.

Reaching the data from outside needs an export; these tests turn themselves on once blockd
implements the NBD server (``nbd-server-start``, ``block-export-add``) and skip until then.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import blockd
from blockd.testing import qemu_io
from blockd.testing.process import tool_env

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed (Debian python3-libnbd)")

NBD_COMMANDS = ("nbd-server-start", "block-export-add", "block-export-del")

MiB = 1 << 20


def nbd_uri(socket_path: Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={socket_path}"


def start_export(qmp, tmp_path: Path, node: str, name: str, writable: bool = True) -> str:
    sock = tmp_path / "nbd.sock"
    if not sock.exists():
        qmp.command("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.command("block-export-add", type="nbd", id=name, node_name=node, name=name, writable=writable)
    return nbd_uri(sock, name)


@pytest.mark.requires_command(*NBD_COMMANDS)
def test_file_node_data(daemon, raw_image, tmp_path: Path, write_pattern, verify_pattern, verify_zero) -> None:
    image = raw_image(16 * MiB)
    write_pattern(image, 0, 4 * MiB, seed=1)
    proc = daemon("--blockdev", f"file,node-name=f0,filename={image}")
    uri = start_export(proc.qmp, tmp_path, "f0", "disk")
    verify_pattern(uri, 0, 4 * MiB, seed=1)  # read through blockd
    write_pattern(uri, 8 * MiB, 2 * MiB, seed=2)  # write through blockd
    verify_pattern(image, 8 * MiB, 2 * MiB, seed=2)  # and find it in the file
    verify_zero(image, 12 * MiB, 4 * MiB)
    proc.qmp.command("block-export-del", id="disk")
    proc.qmp.event_wait("BLOCK_EXPORT_DELETED", timeout=10, match={"data": {"id": "disk"}})


@pytest.mark.requires_command(*NBD_COMMANDS)
def test_raw_offset_and_size(daemon, raw_image, tmp_path: Path, write_pattern, verify_pattern) -> None:
    image = raw_image(8 * MiB)
    write_pattern(image, 0, 8 * MiB, seed=3)
    proc = daemon(
        "--blockdev", f"file,node-name=f0,filename={image}",
        "--blockdev", f"raw,node-name=r0,file=f0,offset={2 * MiB},size={4 * MiB}",
    )
    uri = start_export(proc.qmp, tmp_path, "r0", "window")
    handle = nbd.NBD()
    handle.connect_uri(uri)
    try:
        assert handle.get_size() == 4 * MiB
        assert handle.pread(MiB, 0) == open(image, "rb").read()[2 * MiB : 3 * MiB]
        write_pattern(handle, 0, MiB, seed=4)
        handle.flush()
    finally:
        handle.shutdown()
    verify_pattern(image, 2 * MiB, MiB, seed=4, pattern_offset=0)
    verify_pattern(image, 0, 2 * MiB, seed=3)  # outside the window: untouched
    verify_pattern(image, 3 * MiB, 5 * MiB, seed=3)


@pytest.mark.requires_command(*NBD_COMMANDS)
def test_null_co_reads_zeroes(daemon, tmp_path: Path, verify_zero) -> None:
    proc = daemon("--blockdev", f"null-co,node-name=n0,size={4 * MiB},read-zeroes=on")
    uri = start_export(proc.qmp, tmp_path, "n0", "null", writable=False)
    verify_zero(uri, 0, 4 * MiB)


def lock_outcomes(start_daemon, image: Path, tmp_path: Path) -> tuple[bool, bool, bool]:
    """Who may use ``image`` while a daemon exports it writable: (qemu-io write, qemu-img info
    without -U, a second daemon exporting it writable)."""
    first = start_daemon("--blockdev", f"file,node-name=f0,filename={image}")
    start_export(first.qmp, tmp_path, "f0", "disk")
    io_write = qemu_io("-f", "raw", "-c", "write 0 512", str(image), check=False).returncode == 0
    info = subprocess.run(["qemu-img", "info", str(image)], capture_output=True, text=True,
                          env=tool_env()).returncode == 0
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = start_daemon("--blockdev", f"file,node-name=f0,filename={image}")
    try:
        start_export(second.qmp, second_dir, "f0", "disk")
        second_ok = True
    except blockd.ExecuteError:
        second_ok = False
    for proc in (second, first):
        assert proc.quit() == 0
    return io_write, info, second_ok


@pytest.mark.requires_command(*NBD_COMMANDS)
def test_image_locking_matches_qsd(daemon, qsd, raw_image, tmp_path: Path) -> None:
    # Image locks follow QEMU's lock bytes: what conflicts depends on the permissions each user
    # takes and shares. Run the same scenario on both daemons and expect the same outcome.
    image = raw_image(MiB)
    (tmp_path / "qsd").mkdir()
    (tmp_path / "blockd").mkdir()
    reference = lock_outcomes(qsd, image, tmp_path / "qsd")
    ours = lock_outcomes(daemon, image, tmp_path / "blockd")
    assert ours == reference


def test_image_on_disk_is_untouched_by_open_and_close(daemon, raw_image, write_pattern, verify_pattern) -> None:
    # Opening and closing a file node (no export needed) must not change the image.
    image = raw_image(2 * MiB)
    write_pattern(image, 0, 2 * MiB, seed=9)
    proc = daemon("--blockdev", f"file,node-name=f0,filename={image}",
                  "--blockdev", "raw,node-name=r0,file=f0")
    nodes = {node["node-name"]: node for node in proc.qmp.command("query-named-block-nodes", flat=True)}
    assert nodes["r0"]["image"]["virtual-size"] == 2 * MiB
    assert proc.quit() == 0
    verify_pattern(image, 0, 2 * MiB, seed=9)
    # and qemu-io can now write it: no lock left behind
    qemu_io("-f", "raw", "-c", "write -P 0x5a 0 512", str(image))
