"""The guest harness of the vhost-user-blk tests (blockd.testing.guest) on its own, without a boot:
its initramfs unpacks with busybox's cpio, the modules come in dependency order, and a QEMU that
cannot start reports why instead of hanging.
"""

from __future__ import annotations

import gzip
import re
import subprocess
from pathlib import Path

import pytest

from blockd.testing import guest


@pytest.fixture(scope="module")
def image() -> guest.GuestImage:
    return guest.guest_or_skip()


def test_initramfs_unpacks_with_busybox_cpio(image: guest.GuestImage, tmp_path: Path) -> None:
    archive = guest.build_initramfs(image, "echo hello\n", {"/data/blob": b"\x00\x01" * 3000}, disks=2)
    listing = subprocess.run([str(image.busybox), "cpio", "-t"], input=gzip.decompress(archive),
                             capture_output=True, check=True).stdout.decode().split()
    for name in ("init", "bin/busybox", "test.sh", "data/blob", "usr/local/sbin/blkdiscard"):
        assert name in listing, listing
    assert [name for name in listing if name.startswith("lib/guest-modules/")] == [
        f"lib/guest-modules/{module.name}" for module in image.modules
    ]
    unpacked = tmp_path / "root"
    unpacked.mkdir()
    subprocess.run([str(image.busybox), "cpio", "-i", "-d"], input=gzip.decompress(archive), cwd=unpacked,
                   capture_output=True, check=True)
    assert (unpacked / "data" / "blob").read_bytes() == b"\x00\x01" * 3000
    assert (unpacked / "test.sh").read_text() == "echo hello\n"
    init = (unpacked / "init").read_text()
    assert "for disk in vda vdb;" in init and guest.BEGIN_MARKER in init
    assert (unpacked / "init").stat().st_mode & 0o111


def test_modules_load_after_their_dependencies(image: guest.GuestImage) -> None:
    names = [re.sub(r"^\d+-", "", module.name).removesuffix(".ko") for module in image.modules]
    assert names[-1] in guest.GUEST_MODULES
    for position, module in enumerate(image.modules):
        for dependency in guest._module_depends(module):
            assert dependency in names[:position], f"{names[position]} needs {dependency} first: {names}"


def test_qemu_failing_to_connect_is_reported(image: guest.GuestImage, tmp_path: Path) -> None:
    missing = tmp_path / "nobody-listens.sock"
    with pytest.raises(guest.GuestFailed, match="nobody-listens.sock"):
        guest.run_guest(missing, "true", timeout=60)


def test_output_between_markers_and_values() -> None:
    console = (f"SeaBIOS\r\n[    1.0] noise\r\n{guest.BEGIN_MARKER}\r\na=1\r\nb.c=x y\r\nfree text\r\n"
               f"{guest.END_MARKER} status=3\r\n{guest.KERNEL_LOG_MARKER}\r\n[    2.0] log line\r\n")
    found = guest._between_markers(console)
    assert found == ("a=1\nb.c=x y\nfree text\n", 3)
    result = guest.GuestResult(output=found[0], status=found[1], console=console, qemu_stderr="")
    assert result.values() == {"a": "1", "b.c": "x y"}
    assert result.kernel_log == "[    2.0] log line\n"
    assert guest._between_markers(console.split(guest.END_MARKER)[0]) is None
