"""Differential tests: the same quorum scenario run by qemu-storage-daemon 7.2 and by blockd-daemon
gives the same replies, the same event payloads and the same data (read with libnbd, and the child
files read directly).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import pytest

from blockd.errors import ExecuteError
from blockd.testing import DaemonProcess
from blockd.testing.clients import import_libnbd

nbd = import_libnbd()
pytestmark = [
    pytest.mark.requires_qsd,
    pytest.mark.skipif(nbd is None, reason="python3-libnbd (module nbd) is not installed"),
]

SIZE = 1 << 20
Start = Callable[..., DaemonProcess]


def outcome(proc: DaemonProcess, command: str, arguments: dict[str, Any]) -> Any:
    """The command's return value, or ("error", class, desc)."""
    assert proc.qmp is not None
    try:
        return proc.qmp.command(command, arguments)
    except ExecuteError as error:
        return ("error", error.error_class, error.desc)


def both(daemon: Start, qsd: Start) -> list[DaemonProcess]:
    return [qsd(), daemon()]


def connect(sock: str) -> Any:
    handle = nbd.NBD()
    handle.set_export_name("q")
    handle.connect_unix(sock)
    return handle


def child_file(path: Path, name: str) -> dict[str, Any]:
    return {"driver": "file", "node-name": name, "filename": str(path), "locking": "off"}


def test_option_validation_matches(daemon: Start, qsd: Start, tmp_path: Path) -> None:
    files = []
    for index, size in enumerate((SIZE, SIZE, SIZE, 2 * SIZE)):
        path = tmp_path / f"f{index}.raw"
        path.write_bytes(bytes(size))
        files.append(path)

    def quorum(children: list[int], **options: Any) -> dict[str, Any]:
        return {"driver": "quorum", "node-name": "q",
                "children": [{"driver": "file", "filename": str(files[i]), "locking": "off"} for i in children],
                **options}

    cases = [
        quorum([0, 1, 2], **{"vote-threshold": 0}),
        quorum([0, 1, 2], **{"vote-threshold": -3}),
        quorum([0, 1, 2], **{"vote-threshold": 4}),
        quorum([], **{"vote-threshold": 1}),
        quorum([0, 1, 2], **{"vote-threshold": 2, "blkverify": True}),
        quorum([0, 1], **{"vote-threshold": 1, "blkverify": True}),
        quorum([0, 1], **{"vote-threshold": 2, "blkverify": True, "rewrite-corrupted": True}),
        quorum([0, 3], **{"vote-threshold": 1}),
        quorum([0, 1], **{"vote-threshold": 2, "read-pattern": "fifo", "rewrite-corrupted": True}),
        quorum([0, 1], **{"vote-threshold": 2, "read-pattern": "random"}),
        {"driver": "quorum", "node-name": "q", "children": [str(files[0])]},
    ]
    results = []
    for proc in both(daemon, qsd):
        results.append([outcome(proc, "blockdev-add", case) for case in cases])
    assert results[1] == results[0]
    assert results[0][0] == ("error", "GenericError", "Parameter 'vote-threshold' expects a value >= 1")


def test_x_blockdev_change_matches(daemon: Start, qsd: Start, tmp_path: Path) -> None:
    steps: list[tuple[str, dict[str, Any]]] = []
    for index, size in enumerate((SIZE, SIZE, SIZE, 2 * SIZE)):
        path = tmp_path / f"f{index}.raw"
        path.write_bytes(bytes(size))
        steps.append(("blockdev-add", child_file(path, f"f{index}")))
    steps += [
        ("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 2, "children": ["f0", "f1"]}),
        ("x-blockdev-change", {"parent": "q", "child": "children.0"}),
        ("x-blockdev-change", {"parent": "q", "node": "f2"}),
        ("x-blockdev-change", {"parent": "q", "node": "f2"}),
        ("x-blockdev-change", {"parent": "q", "node": "f3"}),
        ("x-blockdev-change", {"parent": "q", "child": "children.1"}),
        ("x-blockdev-change", {"parent": "q", "child": "children.1"}),
        ("x-blockdev-change", {"parent": "q", "child": "nope"}),
        ("x-blockdev-change", {"parent": "q", "node": "f1"}),
        ("x-blockdev-change", {"parent": "q", "child": "children.0", "node": "f1"}),
        ("x-blockdev-change", {"parent": "q"}),
        ("x-blockdev-change", {"parent": "f0", "node": "f1"}),
        ("x-blockdev-change", {"parent": "zz", "node": "f1"}),
        ("x-blockdev-change", {"parent": "q", "node": "zz"}),
        ("x-blockdev-change", {"parent": "q", "child": "children.3"}),
        ("x-blockdev-change", {"parent": "q", "child": "children.2"}),
        ("blockdev-add", {"driver": "quorum", "node-name": "v", "vote-threshold": 2, "blkverify": True,
                          "children": ["f2", "f3"]}),
    ]
    results = []
    for proc in both(daemon, qsd):
        results.append([outcome(proc, command, arguments) for command, arguments in steps])
        # The children that are left, in their order.
        nodes = {n["node-name"]: n for n in proc.qmp.command("query-named-block-nodes")}  # type: ignore[union-attr]
        results[-1].append(nodes["q"]["image"]["filename"].count("f1.raw"))
    assert results[1] == results[0]


def test_scenario_events_and_data_match(daemon: Start, qsd: Start, tmp_path: Path) -> None:
    """Three children, rewrite-corrupted: a corrupt copy outvoted and repaired, a read with no
    majority, a write that fails on one child (blkdebug under a raw layer), a flush that fails on
    it. Only the last step shares a rate-limiting key with an earlier one."""
    original = random.Random(7).randbytes(SIZE)
    observed = []
    for name, start in (("qsd", qsd), ("blockd", daemon)):
        directory = tmp_path / name
        directory.mkdir()
        paths = [directory / f"c{i}.raw" for i in range(3)]
        for path in paths:
            path.write_bytes(original)
        proc = start()
        qmp = proc.qmp
        assert qmp is not None
        blkdebug = {"driver": "blkdebug", "node-name": "d2", "image": child_file(paths[2], "f2"),
                    "inject-error": [{"event": "write_aio", "errno": 28},
                                     {"event": "flush_to_os", "iotype": "flush"}]}
        qmp.command("blockdev-add", {
            "driver": "quorum", "node-name": "q", "vote-threshold": 2, "rewrite-corrupted": True,
            "children": [child_file(paths[0], "c0"), child_file(paths[1], "c1"),
                         {"driver": "raw", "node-name": "r2", "file": blkdebug}]})
        sock = str(directory / "nbd.sock")
        qmp.command("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        qmp.command("block-export-add", type="nbd", id="e", **{"node-name": "q", "writable": True})
        handle = connect(sock)
        record: dict[str, Any] = {}

        def events(expected: list[str]) -> list[Any]:
            got = [qmp.event_wait(name, timeout=10) for name in expected]
            got += qmp.get_events(wait=0.1)
            return [(event["event"], event.get("data")) for event in got]

        # 1. Child c1 corrupt: outvoted, reported, repaired.
        with open(paths[1], "r+b") as f:
            f.seek(65536 + 100)
            f.write(b"\xee" * 3000)
        record["read"] = handle.pread(16384, 65536) == original[65536:65536 + 16384]
        record["read events"] = events(["QUORUM_REPORT_BAD"])
        record["repaired"] = paths[1].read_bytes()[65536:65536 + 16384] == original[65536:65536 + 16384]
        # 2. c0 and r2 corrupt in different ways: no majority.
        for index, byte in ((0, b"\x01"), (2, b"\x02")):
            with open(paths[index], "r+b") as f:
                f.seek(300000)
                f.write(byte * 700)
        try:
            handle.pread(1024, 299800)
            record["no majority"] = "read succeeded"
        except nbd.Error:
            # qemu-storage-daemon 7.2 drops the connection when a structured read fails
            # (ENOTCONN); blockd replies EIO and keeps it. Both fail the read.
            record["no majority"] = "read failed"
        record["no majority events"] = events(["QUORUM_FAILURE"])
        del handle
        handle = connect(sock)
        # 3. A write that fails on r2 (ENOSPC) still succeeds on c0 and c1.
        handle.pwrite(b"w" * 4096, 8192)
        record["write events"] = events(["QUORUM_REPORT_BAD"])
        record["written"] = [p.read_bytes()[8192:8192 + 4096] == b"w" * 4096 for p in paths]
        # 4. A flush that fails on r2 succeeds; its report shares r2's rate-limiting window with
        # the write's, so it arrives when that window closes, about a second later.
        handle.flush()
        record["flush events"] = events(["QUORUM_REPORT_BAD"])
        handle.shutdown()
        assert proc.quit() == 0
        observed.append(record)
    assert observed[1] == observed[0]
    # And the reference itself says what the issue expects.
    assert observed[0]["read events"] == [("QUORUM_REPORT_BAD", {
        "type": "read", "node-name": "c1", "sector-num": 128, "sectors-count": 32})]
    assert observed[0]["no majority events"] == [("QUORUM_FAILURE", {
        "reference": "q", "sector-num": 585, "sectors-count": 3})]
    assert observed[0]["written"] == [True, True, False]
    assert observed[0]["write events"] == [("QUORUM_REPORT_BAD", {
        "type": "write", "node-name": "r2", "error": "No space left on device", "sector-num": 16,
        "sectors-count": 8})]
    assert observed[0]["flush events"] == [("QUORUM_REPORT_BAD", {
        "type": "flush", "node-name": "r2", "error": "Input/output error", "sector-num": 0,
        "sectors-count": 0})]
