"""QEMU's own QMP client library (qemu.qmp from PyPI) talking to blockd-daemon."""

from __future__ import annotations

import asyncio

import pytest

qmp_lib = pytest.importorskip("qemu.qmp", reason="qemu.qmp is not installed (pip install qemu.qmp)")
from qemu.qmp.legacy import QEMUMonitorProtocol  # noqa: E402


def test_async_client(daemon) -> None:
    proc = daemon("--blockdev", "null-co,node-name=n0,size=4096")
    proc.qmp.close()  # leave the stage to qemu.qmp on a second connection

    async def session() -> None:
        client = qmp_lib.QMPClient("blockd-test")
        await client.connect(str(proc.qmp_path))
        version = await client.execute("query-version")
        assert set(version) == {"qemu", "package"}
        nodes = await client.execute("query-named-block-nodes", {"flat": True})
        assert [node["node-name"] for node in nodes] == ["n0"]
        with pytest.raises(qmp_lib.ExecuteError) as info:
            await client.execute("blockdev-del", {"node-name": "nope"})
        assert info.value.error_class == "GenericError"
        with pytest.raises(qmp_lib.ExecuteError) as info:
            await client.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        await client.execute("quit")
        try:
            await client.disconnect()
        except EOFError:
            pass  # the server closed first, as qemu-storage-daemon does after quit

    asyncio.run(session())
    assert proc.wait() == 0


def test_legacy_sync_client(daemon) -> None:
    proc = daemon()
    proc.qmp.close()
    legacy = QEMUMonitorProtocol(str(proc.qmp_path))
    greeting = legacy.connect(negotiate=True)
    assert "QMP" in greeting
    reply = legacy.cmd_obj({"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "x"}})
    assert reply == {"return": {}}
    reply = legacy.cmd_obj({"execute": "query-named-block-nodes"})
    assert [node["node-name"] for node in reply["return"]] == ["x"]
    # qemu.qmp's legacy client reports the server closing after quit as EOFError (it does so
    # with qemu-storage-daemon too).
    try:
        assert legacy.cmd_obj({"execute": "quit"}) == {"return": {}}
    except EOFError:
        pass
    try:
        legacy.close()
    except EOFError:
        pass
    assert proc.wait() == 0
