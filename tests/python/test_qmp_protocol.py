"""The QMP protocol over a socket: greeting, negotiation, ids, bad input, several monitors.

The server is blockd.qmp.QMPServer on an in-process Engine; the expected texts are those of
qemu-storage-daemon 7.2.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import blockd
from blockd import Engine
from blockd.qmp import QMPClient, QMPServer

NEGOTIATE_FIRST = "Expecting capabilities negotiation with 'qmp_capabilities'"


@pytest.fixture
def server(engine: Engine, tmp_path: Path) -> Iterator[tuple[QMPServer, str]]:
    path = str(tmp_path / "qmp.sock")
    with QMPServer(engine) as qmp_server:
        qmp_server.add_unix(path)
        yield qmp_server, path
    assert not Path(path).exists(), "stop() must remove the socket file"


@pytest.fixture
def client(server: tuple[QMPServer, str]) -> Iterator[QMPClient]:
    with QMPClient(server[1]) as qmp:
        yield qmp


def error(reply: dict) -> tuple[str, str]:
    return reply["error"]["class"], reply["error"]["desc"]


def test_greeting_and_negotiation(server: tuple[QMPServer, str]) -> None:
    with QMPClient(server[1], negotiate=False) as qmp:
        greeting = qmp.greeting
        assert set(greeting) == {"QMP"}
        assert set(greeting["QMP"]) == {"version", "capabilities"}
        assert set(greeting["QMP"]["version"]) == {"qemu", "package"}
        assert isinstance(greeting["QMP"]["capabilities"], list)
        assert error(qmp.cmd("query-version")) == ("CommandNotFound", NEGOTIATE_FIRST)
        reply = qmp.cmd_obj({"execute": "query-version", "id": [1, {"a": None}]})
        assert reply["id"] == [1, {"a": None}] and error(reply) == ("CommandNotFound", NEGOTIATE_FIRST)
        assert error(qmp.cmd("qmp_capabilities", bogus=1)) == ("GenericError", "Parameter 'bogus' is unexpected")
        assert qmp.cmd("qmp_capabilities") == {"return": {}}
        reply = qmp.cmd_obj({"execute": "qmp_capabilities", "id": 7})
        assert reply == {
            "id": 7,
            "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"},
        }
        assert "return" in qmp.cmd("query-version")


@pytest.mark.parametrize("request_id", [0, -1, 1.5, "text", None, True, [1, "x"], {"nested": {"deep": [None]}}])
def test_id_is_echoed(client: QMPClient, request_id: object) -> None:
    reply = client.cmd_obj({"execute": "query-version", "id": request_id})
    assert reply["id"] == request_id and "return" in reply
    reply = client.cmd_obj({"execute": "no-such-command", "id": request_id})
    assert reply["id"] == request_id
    assert error(reply) == ("CommandNotFound", "The command no-such-command has not been found")


@pytest.mark.parametrize(
    ("raw", "desc"),
    [
        (b"[1, 2]\n", "QMP input must be a JSON object"),
        (b'"text"\n', "QMP input must be a JSON object"),
        (b"42\n", "QMP input must be a JSON object"),
        (b'{"foo": 1}\n', "QMP input member 'foo' is unexpected"),
        (b'{"execute": 1}\n', "QMP input member 'execute' must be a string"),
        (b'{"execute": "query-version", "arguments": []}\n', "QMP input member 'arguments' must be an object"),
        (b'{"execute": "query-version", "arguments": {"a": 1}}\n', "Parameter 'a' is unexpected"),
        (b'{"execute": "query-version", "bogus": 1}\n', "QMP input member 'bogus' is unexpected"),
        (b"}\n", "JSON parse error, expecting value"),
        (b"{bad json}\n", "JSON parse error, invalid keyword 'bad'"),
    ],
)
def test_bad_requests(client: QMPClient, raw: bytes, desc: str) -> None:
    client.send_raw(raw)
    assert error(client.read_response()) == ("GenericError", desc)
    assert "return" in client.cmd("query-version"), "the monitor must keep working"


def test_invalid_utf8_and_split_input(client: QMPClient) -> None:
    client.send_raw(b'{"a":\xff}\n')
    first = client.read_response()
    assert first["error"]["class"] == "GenericError"
    assert first["error"]["desc"].startswith("JSON parse error")
    # a request split over several writes still works once complete (after any further replies
    # to the bad bytes above)
    client.send_raw(b'{"execute": "query-')
    client.send_raw(b'version", "id": "split"}\n')
    while True:
        reply = client.read_response()
        if reply.get("id") == "split":
            break
        assert reply["error"]["class"] == "GenericError"
    assert "return" in reply


def test_deep_nesting(client: QMPClient) -> None:
    client.send_raw(b"{" * 2000 + b"\n")
    reply = client.read_response(timeout=10)
    assert error(reply) == ("GenericError", "JSON nesting depth limit exceeded")
    # Whatever else came back for the rest of the junk, the monitor answers again:
    while True:
        client.send_raw(b'{"execute": "query-version", "id": "probe"}\n')
        reply = client.read_response(timeout=10)
        if reply.get("id") == "probe":
            break
    assert "return" in reply


def test_deep_nesting_in_valid_request(client: QMPClient) -> None:
    text = b'{"execute": "query-version", "id": ' + b"[" * 2000 + b"1" + b"]" * 2000 + b"}\n"
    client.send_raw(text)
    reply = client.read_response(timeout=10)
    assert error(reply) == ("GenericError", "JSON nesting depth limit exceeded")
    while True:
        client.send_raw(b'{"execute": "query-version", "id": "probe"}\n')
        reply = client.read_response(timeout=10)
        if reply.get("id") == "probe":
            break
    assert "return" in reply


def test_oversized_request(client: QMPClient) -> None:
    huge = b'{"execute": "query-version", "id": "' + b"x" * (80 << 20) + b'"}\n'
    client.send_raw(huge)
    reply = client.read_response(timeout=120)
    assert reply["error"]["class"] == "GenericError", reply
    while True:
        client.send_raw(b'{"execute": "query-version", "id": "probe"}\n')
        reply = client.read_response(timeout=10)
        if reply.get("id") == "probe":
            break
    assert "return" in reply


def test_query_commands(client: QMPClient) -> None:
    names = [entry["name"] for entry in client.command("query-commands")]
    assert len(names) == len(set(names))
    for required in ("qmp_capabilities", "query-version", "query-commands", "query-qmp-schema", "quit",
                     "blockdev-add", "blockdev-del", "query-named-block-nodes"):
        assert required in names
    for entry in client.command("query-commands"):
        assert set(entry) == {"name"}
    # Every command it lists exists: none answers CommandNotFound.
    schema = {entity["name"] for entity in client.command("query-qmp-schema") if entity["meta-type"] == "command"}
    assert set(names) <= schema


def test_commands_not_listed_are_absent(client: QMPClient) -> None:
    listed = {entry["name"] for entry in client.command("query-commands")}
    for name in ("blockdev-snapshot-internal-sync", "nbd-server-start", "block-export-add", "eject"):
        if name not in listed:
            assert client.cmd(name)["error"]["class"] == "CommandNotFound"


def test_query_version(client: QMPClient) -> None:
    version = client.command("query-version")
    assert isinstance(version["package"], str)
    assert all(isinstance(version["qemu"][key], int) for key in ("major", "minor", "micro"))


def test_quit_closes_connection(engine: Engine, server: tuple[QMPServer, str]) -> None:
    other = QMPClient(server[1])
    with QMPClient(server[1]) as qmp:
        assert qmp.cmd("quit") == {"return": {}}
        with pytest.raises(blockd.ConnectionClosed):
            qmp.read_response(timeout=10)
    assert engine.wait_shutdown(5)
    other.close()


def test_many_monitors(server: tuple[QMPServer, str]) -> None:
    clients = [QMPClient(server[1]) for _ in range(8)]
    try:
        results: list[object] = [None] * len(clients)

        def work(index: int) -> None:
            for step in range(10):
                name = f"m{index}-{step}"
                clients[index].command("blockdev-add", driver="null-co", node_name=name)
                clients[index].command("blockdev-del", node_name=name)
            results[index] = clients[index].command("query-version")

        threads = [threading.Thread(target=work, args=(index,)) for index in range(len(clients))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(isinstance(result, dict) for result in results)
    finally:
        for qmp in clients:
            qmp.close()


def test_client_that_does_not_read(server: tuple[QMPServer, str]) -> None:
    # A client that floods requests and never reads must not stop others from being served.
    lazy = socket.socket(socket.AF_UNIX)
    lazy.connect(server[1])
    lazy.setblocking(False)
    request = b'{"execute": "qmp_capabilities"}\n' + b'{"execute": "query-qmp-schema"}\n' * 50
    try:
        lazy.send(request)
    except BlockingIOError:
        pass
    with QMPClient(server[1], timeout=30) as qmp:
        assert "return" in qmp.cmd("query-version")
    lazy.close()


def test_tcp_and_pretty(engine: Engine) -> None:
    with QMPServer(engine) as qmp_server:
        listener = qmp_server.add_tcp("127.0.0.1", 0, pretty=True)
        host, port = listener.address
        raw = socket.create_connection((host, port))
        greeting = b""
        while not greeting.endswith(b"}\r\n"):
            greeting += raw.recv(4096)
        assert b"\n    " in greeting, "pretty output is indented"
        raw.close()
        with QMPClient((host, port)) as qmp:
            assert "return" in qmp.cmd("query-version")


def test_stop_closes_clients(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    qmp_server = QMPServer(engine)
    qmp_server.add_unix(path)
    qmp_server.start()
    qmp = QMPClient(str(path))
    qmp_server.stop()
    assert not path.exists()
    with pytest.raises(blockd.ConnectionClosed):
        qmp.cmd("query-version")
    qmp_server.stop()  # idempotent
