"""blockd.Engine: the engine in this process, driven from Python."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import blockd
from blockd import Engine


def test_context_manager_and_close(tmp_path: Path) -> None:
    with Engine() as engine:
        assert not engine.closed
        version = engine.qmp("query-version")
        assert set(version) == {"qemu", "package"}
        assert set(version["qemu"]) == {"major", "minor", "micro"}
    assert engine.closed
    engine.close()  # idempotent
    with pytest.raises(blockd.ProtocolError):
        engine.qmp("query-version")


def test_keyword_names_become_dashes(engine: Engine) -> None:
    assert engine.qmp("blockdev-add", driver="null-co", node_name="n0", size=1 << 20) == {}
    assert engine.qmp("blockdev-add", {"driver": "null-co", "node-name": "n1", "read-zeroes": True}) == {}
    nodes = {node["node-name"]: node for node in engine.qmp("query-named-block-nodes", flat=True)}
    assert set(nodes) == {"n0", "n1"}
    assert nodes["n0"]["drv"] == "null-co"
    assert nodes["n0"]["image"]["virtual-size"] == 1 << 20


def test_error_classes(engine: Engine) -> None:
    with pytest.raises(blockd.CommandNotFound) as info:
        engine.qmp("no-such-command")
    assert info.value.error_class == "CommandNotFound"
    assert info.value.desc == "The command no-such-command has not been found"
    engine.qmp("blockdev-add", driver="null-co", node_name="n0")
    with pytest.raises(blockd.GenericError) as info:
        engine.qmp("blockdev-add", driver="null-co", node_name="n0")
    assert info.value.desc == "Duplicate nodes with node-name='n0'"
    with pytest.raises(blockd.GenericError, match="Parameter 'bogus' is unexpected"):
        engine.qmp("blockdev-add", driver="null-co", node_name="n2", bogus=1)
    with pytest.raises(blockd.GenericError, match="Parameter 'driver' is missing"):
        engine.qmp("blockdev-add", node_name="n3")
    with pytest.raises(blockd.GenericError, match="Failed to find node with node-name='zz'"):
        engine.qmp("blockdev-del", node_name="zz")


def test_execute_returns_whole_reply(engine: Engine) -> None:
    reply = engine.execute({"execute": "query-version", "id": ["any", {"json": 1}]})
    assert reply["id"] == ["any", {"json": 1}] and "return" in reply
    assert engine.execute('{"execute": "nope", "id": 5}') == {
        "id": 5,
        "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
    }
    assert engine.execute("[1, 2]")["error"]["class"] == "GenericError"
    # no negotiation is needed in-process
    assert "return" in engine.execute({"execute": "query-commands"})


def test_file_and_raw_nodes(engine: Engine, raw_image, write_pattern) -> None:
    image = raw_image(4 << 20)
    write_pattern(image, 0, 4 << 20, seed=7)
    engine.qmp("blockdev-add", driver="file", node_name="f0", filename=str(image))
    engine.qmp("blockdev-add", driver="raw", node_name="r0", file="f0", offset=1 << 20, size=2 << 20)
    nodes = {node["node-name"]: node for node in engine.qmp("query-named-block-nodes", flat=True)}
    assert nodes["f0"]["drv"] == "file" and nodes["f0"]["file"] == str(image)
    assert nodes["f0"]["image"]["virtual-size"] == 4 << 20
    assert nodes["r0"]["drv"] == "raw" and nodes["r0"]["image"]["virtual-size"] == 2 << 20
    with pytest.raises(blockd.GenericError):
        engine.qmp("blockdev-del", node_name="f0")  # in use by r0
    engine.qmp("blockdev-del", node_name="r0")
    engine.qmp("blockdev-del", node_name="f0")
    assert engine.qmp("query-named-block-nodes") == []


def test_missing_file_error(engine: Engine, tmp_path: Path) -> None:
    missing = tmp_path / "missing.img"
    with pytest.raises(blockd.GenericError) as info:
        engine.qmp("blockdev-add", driver="file", node_name="f0", filename=str(missing))
    assert info.value.desc == f"Could not open '{missing}': No such file or directory"


def test_iothreads(engine: Engine) -> None:
    engine.qmp("object-add", qom_type="iothread", id="io0")
    threads = engine.qmp("query-iothreads")
    assert [thread["id"] for thread in threads] == ["io0"]
    assert threads[0]["thread-id"] > 0
    engine.qmp("object-del", id="io0")
    assert engine.qmp("query-iothreads") == []


def test_events_api_without_events(engine: Engine) -> None:
    assert engine.events.get(timeout=0) is None
    assert engine.events.get_all() == []
    with pytest.raises(TimeoutError):
        engine.events.wait("BLOCK_EXPORT_DELETED", timeout=0.05)
    engine.events.clear()


def test_commands_from_many_threads(engine: Engine) -> None:
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for step in range(20):
                name = f"t{index}s{step}"
                engine.qmp("blockdev-add", driver="null-co", node_name=name)
                engine.qmp("blockdev-del", node_name=name)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert engine.qmp("query-named-block-nodes") == []


def test_quit_is_seen_by_wait_shutdown() -> None:
    with Engine() as engine:
        assert engine.wait_shutdown(0) is False
        assert engine.qmp("quit") == {}
        assert engine.wait_shutdown(5) is True


def test_cli_option(engine: Engine) -> None:
    engine.cli_option("blockdev", {"driver": "null-co", "node-name": "c0"})
    engine.cli_option("blockdev", json.dumps({"driver": "null-co", "node-name": "c1"}))
    with pytest.raises(blockd.GenericError, match="Duplicate nodes with node-name='c0'"):
        engine.cli_option("blockdev", {"driver": "null-co", "node-name": "c0"})
    assert {node["node-name"] for node in engine.qmp("query-named-block-nodes")} == {"c0", "c1"}


def test_keyval_parse() -> None:
    from blockd import _core

    tree = json.loads(_core.keyval_parse("null-co,node-name=n0,cache.direct=on,x=a,,b", "driver"))
    assert tree == {"driver": "null-co", "node-name": "n0", "cache": {"direct": "on"}, "x": "a,b"}
    listed = json.loads(_core.keyval_parse("x.0=a,x.1=b"))
    assert listed == {"x": ["a", "b"]}
    assert json.loads(_core.keyval_parse("a=1,a=2")) == {"a": "2"}  # the last one wins, as in QEMU
    with pytest.raises(ValueError, match="Parameters 'x.[*]' used inconsistently"):
        _core.keyval_parse("x.y=1,x=2")


@pytest.mark.requires_command("nbd-server-start", "block-export-add", "block-export-del")
def test_export_deleted_event(engine: Engine, tmp_path: Path) -> None:
    engine.qmp("blockdev-add", driver="null-co", node_name="n0")
    engine.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "nbd.sock")}})
    for name in ("e0", "e1"):
        engine.qmp("block-export-add", type="nbd", id=name, node_name="n0", name=name)
    for name in ("e0", "e1"):
        engine.qmp("block-export-del", id=name)
    second = engine.events.wait("BLOCK_EXPORT_DELETED", match={"data": {"id": "e1"}}, timeout=10)
    assert second["data"] == {"id": "e1"}
    assert set(second["timestamp"]) == {"seconds", "microseconds"}
    first = engine.events.get(timeout=10)  # skipped by wait(), still queued
    assert first is not None and first["event"] == "BLOCK_EXPORT_DELETED" and first["data"] == {"id": "e0"}
    engine.qmp("nbd-server-stop")
