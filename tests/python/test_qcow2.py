"""qcow2 with internal snapshots, checked both ways with QEMU's tools.

Images qemu-img made (many variants) read the same through blockd's NBD export as through
qemu-img; images blockd wrote and snapshotted pass ``qemu-img check`` and compare equal to a raw
reference; snapshot commands give qemu-storage-daemon's errors; ``qemu-img snapshot`` agrees with
our snapshot table.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

import blockd
from blockd.snapshots import InternalSnapshots
from blockd.testing.images import qemu_img, qemu_io

nbd = pytest.importorskip("nbd")


def check_clean(path: Path) -> None:
    result = qemu_img("check", "--output=json", str(path), check=False)
    report = json.loads(result.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, result.stdout
    assert report.get("check-errors", 0) == 0, result.stdout


def add_qcow2(engine: Any, path: Path, node: str = "disk", **options: Any) -> None:
    options = {key.replace("_", "-"): value for key, value in options.items()}
    engine.qmp(
        "blockdev-add",
        {"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": str(path)}, **options},
    )


class Export:
    """An NBD export of `node` on a unix socket, with a libnbd handle."""

    def __init__(self, engine: Any, tmp_path: Path, node: str = "disk", writable: bool = False) -> None:
        self.engine = engine
        self.socket = tmp_path / "nbd.sock"
        engine.qmp("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(self.socket)}}})
        engine.qmp("block-export-add", {"type": "nbd", "id": "exp", "node-name": node, "writable": writable})
        self.uri = f"nbd+unix:///{node}?socket={self.socket}"
        self.handle = nbd.NBD()
        self.handle.connect_uri(self.uri)

    def close(self) -> None:
        self.handle.shutdown()
        self.engine.qmp("block-export-del", {"id": "exp"})
        self.engine.qmp("nbd-server-stop")


def compare(reference: Path, uri_or_path: str, fmt: str = "raw") -> None:
    result = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "raw", "-F", fmt, str(reference), uri_or_path],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


VARIANTS = [
    pytest.param(["-o", "compat=0.10"], id="v2"),
    pytest.param(["-o", "cluster_size=512"], id="512B"),
    pytest.param(["-o", "cluster_size=2M"], id="2M"),
    pytest.param(["-o", "refcount_bits=1"], id="refcount1"),
    pytest.param(["-o", "refcount_bits=64,lazy_refcounts=on"], id="refcount64-lazy"),
]


@pytest.mark.parametrize("options", VARIANTS)
def test_images_qemu_made_read_the_same(engine: Any, tmp_path: Path, options: list[str]) -> None:
    image = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", *options, str(image), "8M")
    qemu_io("-c", "write -P 0x11 0 1M", "-c", "write -z 2M 512k", "-c", "write -P 0x22 3M 100k",
            "-c", "write -P 0x33 7M 1M", str(image))
    snapshot = "refcount_bits=1" not in options[-1]  # one-bit refcounts cannot share clusters
    if snapshot:
        qemu_img("snapshot", "-c", "s1", str(image))
    qemu_io("-c", "write -P 0x44 512k 1M", "-c", "discard 7M 512k", str(image))
    reference = tmp_path / "ref.raw"
    qemu_img("convert", "-O", "raw", str(image), str(reference))
    add_qcow2(engine, image, read_only=True)
    export = Export(engine, tmp_path)
    try:
        compare(reference, export.uri)
    finally:
        export.close()
    snapshots = InternalSnapshots(engine, "disk").list()
    assert [(s["id"], s["name"]) for s in snapshots] == ([("1", "s1")] if snapshot else [])


def test_compressed_and_backing_images(engine: Any, tmp_path: Path) -> None:
    source = tmp_path / "src.raw"
    qemu_img("create", "-f", "raw", str(source), "4M")
    qemu_io("-f", "raw", "-c", "write -P 0x55 0 3M", str(source))
    base = tmp_path / "base.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(source), str(base))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    qemu_io("-c", "write -P 0x66 1M 64k", str(top))
    reference = tmp_path / "ref.raw"
    qemu_img("convert", "-O", "raw", str(top), str(reference))
    add_qcow2(engine, top)
    nodes = {n["node-name"]: n for n in engine.qmp("query-named-block-nodes", flat=True)}
    assert nodes["disk"]["image"]["backing-filename"] == "base.qcow2"
    assert nodes["disk"]["backing_file_depth"] == 1
    export = Export(engine, tmp_path)
    try:
        compare(reference, export.uri)
    finally:
        export.close()
    engine.qmp("blockdev-del", node_name="disk")
    check_clean(top)


def close_and_verify(engine: Any, export: Export, image: Path, reference: bytes | bytearray,
                     directory: Path) -> Path:
    """Ends the export and node "disk", then checks the image with qemu-img: no errors or leaks,
    and the same data as `reference`, which is left in DIRECTORY/expected.raw (returned)."""
    export.close()
    engine.qmp("blockdev-del", node_name="disk")
    check_clean(image)
    expected = directory / "expected.raw"
    expected.write_bytes(bytes(reference))
    compare(expected, str(image), "qcow2")
    return expected


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_workload_then_qemu_img_check_and_compare(engine: Any, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    size = 16 << 20
    cluster = rng.choice([4096, 65536])
    image = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster}", str(image), str(size))
    reference = bytearray(size)
    add_qcow2(engine, image, discard="unmap")
    export = Export(engine, tmp_path, writable=True)
    h = export.handle
    snaps = InternalSnapshots(engine, "disk")
    for step in range(150):
        offset = rng.randrange(size)
        length = min(rng.randrange(1, 256 << 10), size - offset)
        kind = rng.random()
        if kind < 0.6:
            data = bytes([rng.randrange(256)]) * length
            h.pwrite(data, offset)
            reference[offset:offset + length] = data
        elif kind < 0.75:
            h.zero(length, offset)
            reference[offset:offset + length] = bytes(length)
        elif kind < 0.85:
            # Discard drops whole clusters only; the reference follows what reads back.
            h.trim(length, offset)
            reference[offset:offset + length] = h.pread(length, offset)
        elif kind < 0.92:
            h.flush()
        elif kind < 0.97:
            snaps.create(f"s{step}")
        elif snaps.list():
            victim = rng.choice(snaps.list())
            snaps.delete(id=victim["id"])
    assert h.pread(size, 0) == bytes(reference)
    close_and_verify(engine, export, image, reference, tmp_path)


def test_snapshots_agree_with_qemu_img(engine: Any, tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "4M")
    add_qcow2(engine, image)
    export = Export(engine, tmp_path, writable=True)
    h = export.handle
    snaps = InternalSnapshots(engine, "disk")
    h.pwrite(b"\x01" * 65536 * 3, 0)
    first = snaps.create("first")
    h.pwrite(b"\x02" * 4096, 65536)
    second = snaps.create("second")
    h.pwrite(b"\x03" * 4096, 0)
    assert (first["id"], second["id"]) == ("1", "2")
    assert snaps.list() == [first, second]
    # Revert through the Python API.
    assert snaps.revert(name="second") == second
    assert h.pread(8192, 0) == b"\x01" * 8192
    assert h.pread(4096, 65536) == b"\x02" * 4096
    h.pwrite(b"\x04" * 512, 0)
    export.close()
    engine.qmp("blockdev-del", node_name="disk")
    check_clean(image)
    listing = qemu_img("snapshot", "-l", str(image)).stdout
    lines = [line.split() for line in listing.splitlines()[2:]]
    assert [(fields[0], fields[1]) for fields in lines] == [("1", "first"), ("2", "second")]
    info = json.loads(qemu_img("info", "--output=json", str(image)).stdout)
    assert [(s["id"], s["name"], s["date-sec"], s["date-nsec"]) for s in info["snapshots"]] == [
        (s["id"], s["name"], s["date-sec"], s["date-nsec"]) for s in (first, second)
    ]
    # qemu-img applies our snapshot: the data is the snapshot's.
    qemu_img("snapshot", "-a", "first", str(image))
    qemu_io("-c", "read -P 0x01 0 196608", str(image))
    check_clean(image)
    # And blockd reads snapshots qemu-img made after ours.
    qemu_img("snapshot", "-c", "third", str(image))
    add_qcow2(engine, image)
    assert [s["name"] for s in snaps.list()] == ["first", "second", "third"]
    assert snaps.delete(id="1")["name"] == "first"
    engine.qmp("blockdev-del", node_name="disk")
    check_clean(image)
    assert "first" not in qemu_img("snapshot", "-l", str(image)).stdout


SNAPSHOT_ERRORS = [
    ("blockdev-snapshot-internal-sync", {"device": "nope", "name": "s"}),
    ("blockdev-snapshot-internal-sync", {"device": "qf", "name": "s"}),
    ("blockdev-snapshot-internal-sync", {"device": "r", "name": "s"}),
    ("blockdev-snapshot-internal-sync", {"device": "ro", "name": "s"}),
    ("blockdev-snapshot-internal-sync", {"device": "q", "name": ""}),
    ("blockdev-snapshot-internal-sync", {"device": "q", "name": "s"}),
    ("blockdev-snapshot-internal-sync", {"device": "q", "name": "s"}),
    ("blockdev-snapshot-internal-sync", {"device": "q", "name": "1"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q", "name": "zz"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q", "id": "9"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q", "id": "2", "name": "s"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "r", "name": "s"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "qf", "name": "s"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "nope", "name": "s"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q", "name": ""}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q", "id": "2", "name": "1"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q", "name": "s"}),
]


def run_error_session(qmp_client: Any, tmp_path: Path, prefix: str) -> list[Any]:
    client = InternalSnapshots(qmp_client, "q")
    for name in ("a", "ro"):
        qemu_img("create", "-f", "qcow2", str(tmp_path / f"{prefix}{name}.qcow2"), "4M")
    qemu_img("create", "-f", "raw", str(tmp_path / f"{prefix}r.raw"), "4M")
    client._call("blockdev-add", {"driver": "qcow2", "node-name": "q",
                                "file": {"driver": "file", "node-name": "qf",
                                         "filename": str(tmp_path / f"{prefix}a.qcow2")}})
    client._call("blockdev-add", {"driver": "raw", "node-name": "r",
                                "file": {"driver": "file", "filename": str(tmp_path / f"{prefix}r.raw")}})
    client._call("blockdev-add", {"driver": "qcow2", "node-name": "ro", "read-only": True,
                                "file": {"driver": "file", "filename": str(tmp_path / f"{prefix}ro.qcow2")}})
    replies: list[Any] = []
    for command, arguments in SNAPSHOT_ERRORS:
        try:
            result = client._call(command, arguments)
            if isinstance(result, dict):
                result = {k: v for k, v in result.items() if k in ("id", "name", "vm-state-size")}
            replies.append(("return", result))
        except blockd.ExecuteError as error:
            replies.append((error.error_class, error.desc))
    return replies


@pytest.mark.requires_qsd
def test_snapshot_errors_match_qsd(daemon: Any, qsd: Any, tmp_path: Path) -> None:
    ours = run_error_session(daemon().qmp, tmp_path, "b-")
    theirs = run_error_session(qsd().qmp, tmp_path, "q-")
    assert ours[5] == ("return", {})
    assert ours == theirs


def test_revert_errors(engine: Any, tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "4M")
    qemu_img("snapshot", "-c", "small", str(image))
    qemu_img("resize", str(image), "8M")
    add_qcow2(engine, image)
    snaps = InternalSnapshots(engine, "disk")
    with pytest.raises(blockd.GenericError, match="Name or id must be provided"):
        snaps.revert()
    with pytest.raises(blockd.GenericError, match="Snapshot with id 'null' and name 'x' does not exist"):
        snaps.revert(name="x")
    with pytest.raises(blockd.GenericError, match="has a virtual size of 4194304 bytes"):
        snaps.revert(name="small")


def test_corrupt_images_give_clear_errors(engine: Any, tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"

    def fresh() -> None:
        qemu_img("create", "-f", "qcow2", str(image), "4M")
        qemu_io("-c", "write -P 0x11 0 64k", str(image))

    def poke(offset: int, data: bytes) -> None:
        with open(image, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def open_error() -> str:
        with pytest.raises(blockd.GenericError) as info:
            add_qcow2(engine, image, node="bad")
        return info.value.desc

    fresh()
    poke(0, b"XXXX")
    assert "Image is not in qcow2 format" in open_error()
    fresh()
    poke(20, (30).to_bytes(4, "big"))
    assert open_error() == "Unsupported cluster size: 2^30"
    fresh()
    poke(40, (0x12345).to_bytes(8, "big"))  # L1 table offset unaligned
    assert open_error() == "Invalid L1 table offset (not cluster aligned)"
    fresh()
    poke(36, (1 << 28).to_bytes(4, "big"))  # absurd L1 size
    assert open_error() == "Active L1 table too large"
    fresh()
    poke(60, (1000).to_bytes(4, "big"))  # snapshots beyond the file
    assert "snapshot table" in open_error()
    # A corrupt L2 pointer: opening works, reading it fails with EIO, the daemon carries on.
    fresh()
    l1_offset = int.from_bytes(image.read_bytes()[40:48], "big")
    poke(l1_offset, (0x80000000_00000000 | (1 << 40)).to_bytes(8, "big"))
    add_qcow2(engine, image, node="bad", read_only=True)
    export = Export(engine, tmp_path, node="bad")
    with pytest.raises(nbd.Error):
        export.handle.pread(4096, 0)
    export.close()
    engine.qmp("blockdev-del", node_name="bad")
    # The corrupt bit: read-only.
    fresh()
    poke(79, b"\x02")
    add_qcow2(engine, image, node="c")
    nodes = {n["node-name"]: n for n in engine.qmp("query-named-block-nodes", flat=True)}
    assert nodes["c"]["ro"] is True
    assert nodes["c"]["image"]["format-specific"]["data"]["corrupt"] is True
