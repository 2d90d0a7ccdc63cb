"""QMPClient against the reference qemu-storage-daemon (so it is not fitted to blockd alone)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

import blockd
from blockd.qmp import QMPClient
from blockd.testing import DaemonProcess, QSD

pytestmark = pytest.mark.requires_qsd


def test_client_with_qsd(qsd, tmp_path: Path) -> None:
    proc = qsd("--blockdev", "null-co,node-name=n0,size=1048576")
    qmp = proc.qmp
    assert qmp.greeting["QMP"]["version"]["qemu"]["major"] == 7
    assert qmp.command("query-version")["qemu"]["minor"] == 2
    # cmd returns the whole reply, command the return value or raises
    assert "error" in qmp.cmd("no-such-command")
    with pytest.raises(blockd.CommandNotFound) as info:
        qmp.command("no-such-command")
    assert info.value.desc == "The command no-such-command has not been found"
    with pytest.raises(blockd.GenericError):
        qmp.command("blockdev-del", node_name="nope")
    reply = qmp.cmd_obj({"execute": "query-version", "id": {"any": ["json", 1, None]}})
    assert reply["id"] == {"any": ["json", 1, None]}
    nodes = qmp.command("query-named-block-nodes", flat=True)
    assert [node["node-name"] for node in nodes] == ["n0"]

    # events arrive in order and event_wait picks by match, keeping the others
    nbd = tmp_path / "nbd.sock"
    qmp.command("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}})
    for index in range(3):
        qmp.command("block-export-add", type="nbd", id=f"e{index}", node_name="n0", name=f"x{index}")
    for index in range(3):
        qmp.command("block-export-del", id=f"e{index}")
    event = qmp.event_wait("BLOCK_EXPORT_DELETED", timeout=10, match={"data": {"id": "e1"}})
    assert event["data"] == {"id": "e1"} and set(event["timestamp"]) == {"seconds", "microseconds"}
    rest = []
    while len(rest) < 2:
        rest += qmp.get_events(wait=10.0)
    assert [event["data"]["id"] for event in rest] == ["e0", "e2"]
    with pytest.raises(TimeoutError):
        qmp.event_wait("BLOCK_EXPORT_DELETED", timeout=0.05)
    assert proc.quit() == 0


def test_client_without_negotiation(qsd) -> None:
    proc = qsd()
    proc.qmp.close()  # a qsd chardev serves one client at a time
    with QMPClient(str(proc.qmp_path), negotiate=False) as client:
        with pytest.raises(blockd.CommandNotFound, match="qmp_capabilities"):
            client.command("query-version")
        client.command("qmp_capabilities")
        assert client.command("query-version")["qemu"]["major"] == 7
        assert client.cmd("quit") == {"return": {}}
    assert proc.wait() == 0


def test_client_tcp_and_pretty(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [
        "--chardev", f"socket,id=t,host=127.0.0.1,port={port},server=on,wait=off",
        "--monitor", "chardev=t,pretty=on",
    ]
    with DaemonProcess(args, command=[QSD], directory=tmp_path) as proc:
        with QMPClient(f"127.0.0.1:{port}") as client:
            assert client.command("query-version")["qemu"]["major"] == 7
            assert client.cmd("nope")["error"]["class"] == "CommandNotFound"
        assert proc.quit() == 0
