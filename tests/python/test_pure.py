"""Pure-Python parts: the error tree, event matching, the event queue and the JSON splitter."""

from __future__ import annotations

import json

import pytest

import blockd
from blockd.errors import ExecuteError, execute_error, raise_for_response
from blockd.events import EventQueue, match_event
from blockd.qmp._stream import JSONSplitter
from blockd._args import qmp_arguments


def test_error_tree() -> None:
    for name in ("GenericError", "CommandNotFound", "DeviceNotFound", "DeviceNotActive", "KVMMissingCap"):
        error = execute_error(name, "what went wrong", command="x")
        assert type(error).__name__ == name
        assert isinstance(error, blockd.ExecuteError)
        assert isinstance(error, blockd.QMPError)
        assert error.error_class == name and error.desc == "what went wrong"
        assert str(error) == f"x: {name}: what went wrong"
    unknown = execute_error("SomethingNew", "d")
    assert type(unknown) is ExecuteError and unknown.error_class == "SomethingNew"
    assert issubclass(blockd.ConnectionClosed, blockd.ProtocolError)
    assert issubclass(blockd.ProtocolError, blockd.QMPError)
    assert not issubclass(blockd.ProtocolError, blockd.ExecuteError)


def test_raise_for_response() -> None:
    assert raise_for_response({"return": {"a": 1}}) == {"a": 1}
    with pytest.raises(blockd.DeviceNotFound) as info:
        raise_for_response({"error": {"class": "DeviceNotFound", "desc": "no"}, "id": 3}, "cmd")
    assert info.value.response == {"error": {"class": "DeviceNotFound", "desc": "no"}, "id": 3}
    with pytest.raises(blockd.ProtocolError):
        raise_for_response({"neither": 1})


def test_qmp_arguments_dashes_top_level_only() -> None:
    merged = qmp_arguments({"read-only": True}, {"node_name": "n0", "cache": {"no_flush": True}})
    assert merged == {"read-only": True, "node-name": "n0", "cache": {"no_flush": True}}
    assert qmp_arguments(None, {}) == {}
    # keywords override the dict
    assert qmp_arguments({"node-name": "a"}, {"node_name": "b"}) == {"node-name": "b"}


@pytest.mark.parametrize(
    ("event", "match", "expected"),
    [
        ({"event": "X", "data": {"id": "e0", "n": 1}}, None, True),
        ({"event": "X", "data": {"id": "e0", "n": 1}}, {"data": {"id": "e0"}}, True),
        ({"event": "X", "data": {"id": "e0", "n": 1}}, {"data": {"id": "e1"}}, False),
        ({"event": "X", "data": {"id": "e0"}}, {"data": {"missing": 1}}, False),
        ({"event": "X", "data": {"l": [1, 2]}}, {"data": {"l": [1, 2]}}, True),
        ({"event": "X", "data": {"l": [1, 2]}}, {"data": {"l": [1]}}, False),
        ({"event": "X", "data": "scalar"}, {"data": {"a": 1}}, False),
    ],
)
def test_match_event(event: dict, match: dict | None, expected: bool) -> None:
    assert match_event(event, match) is expected


def test_event_queue_keeps_skipped_events() -> None:
    texts = [json.dumps({"event": name, "data": {"i": index}}) for index, name in enumerate("ABCA")]
    source_calls: list[float] = []

    def source(timeout: float) -> str | None:
        source_calls.append(timeout)
        return texts.pop(0) if texts else None

    queue = EventQueue(source)
    second_a = queue.wait("A", match={"data": {"i": 3}}, timeout=0)
    assert second_a["data"]["i"] == 3
    assert [event["event"] for event in queue.get_all()] == ["A", "B", "C"]
    assert queue.get(timeout=0) is None
    with pytest.raises(TimeoutError):
        queue.wait("Z", timeout=0)


def test_json_splitter() -> None:
    splitter = JSONSplitter()
    assert splitter.feed(b'{"a": "}{\\"", "b": [1, {"c": 2}]}\r\n{"x"') == [b'{"a": "}{\\"", "b": [1, {"c": 2}]}']
    assert splitter.feed(b": 1}\n") == [b'{"x": 1}']
    pretty = json.dumps({"return": {"a": [1, 2]}}, indent=4).encode() + b"\r\n"
    out = []
    for byte in pretty:
        out += splitter.feed(bytes([byte]))
    assert [json.loads(text) for text in out] == [{"return": {"a": [1, 2]}}]
    assert splitter.feed(b'"str" 12 ') == [b'"str"', b"12"]
    assert len(splitter) == 0
