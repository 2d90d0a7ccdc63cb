"""The vhost-user-blk export's QMP side and what a front-end sees, differentially against
qemu-storage-daemon 7.2: the same block-export-add mistakes give the same errors, and a
front-end (a few vhost-user messages written here, no VM) reads the same queue count and the same
configuration space (capacity, block size, read-only, queues) from both. The data path with a
real QEMU guest is in test_vhost_user_blk.py; the protocol in detail in the C++ unit tests.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from pathlib import Path
from typing import Any, Callable

import pytest

from blockd.testing.guest import guest_or_skip, run_guest

Daemon = Callable[..., Any]
MiB = 1 << 20

GET_FEATURES = 1
GET_QUEUE_NUM = 17
GET_CONFIG = 24
FEATURE_RO = 1 << 5
FEATURE_MQ = 1 << 12
CONFIG_SIZE = 60


def _request(sock: socket.socket, request: int, payload: bytes = b"") -> bytes:
    sock.sendall(struct.pack("<III", request, 1, len(payload)) + payload)
    header = _read(sock, 12)
    reply, flags, size = struct.unpack("<III", header)
    assert (reply, flags) == (request, 0x5)
    return _read(sock, size)


def _read(sock: socket.socket, length: int) -> bytes:
    data = b""
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        assert chunk, "the back-end closed the connection"
        data += chunk
    return data


def frontend_view(path: Path) -> dict[str, Any]:
    """What a vhost-user front-end learns before starting the device."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        (features,) = struct.unpack("<Q", _request(sock, GET_FEATURES))
        (queues,) = struct.unpack("<Q", _request(sock, GET_QUEUE_NUM))
        config = _request(sock, GET_CONFIG, struct.pack("<III", 0, CONFIG_SIZE, 0) + bytes(CONFIG_SIZE))
    assert config[:12] == struct.pack("<III", 0, CONFIG_SIZE, 0)
    config = config[12:]
    return {
        "read-only": bool(features & FEATURE_RO),
        "multiqueue": bool(features & FEATURE_MQ),
        "queue-num": queues,
        # The whole configuration space: capacity, size_max, seg_max, blk_size, topology,
        # writeback, num_queues, discard and write-zeroes limits.
        "config": config.hex(),
    }


BAD_EXPORTS: list[dict[str, Any]] = [
    {"id": "bad", "node-name": "n0"},  # no addr
    {"id": "bad", "node-name": "n0", "addr": {"type": "inet", "host": "127.0.0.1", "port": "1"}},
    {"id": "bad", "node-name": "n0", "addr": {"type": "vsock", "cid": "3", "port": "1"}},
    {"id": "bad", "node-name": "n0", "addr": {"type": "fd", "str": "nosuchfd"}},
    {"id": "bad", "node-name": "n0", "addr": {"type": "unix", "path": "TMP/missing/v.sock"}},
    {"id": "bad", "node-name": "n0", "addr": {"type": "unix", "path": "TMP/v.sock"},
     "logical-block-size": 256},
    {"id": "bad", "node-name": "n0", "addr": {"type": "unix", "path": "TMP/v.sock"},
     "logical-block-size": 4 * MiB},
    {"id": "bad", "node-name": "n0", "addr": {"type": "unix", "path": "TMP/v.sock"},
     "logical-block-size": 1000},
    {"id": "bad", "node-name": "n0", "addr": {"type": "unix", "path": "TMP/v.sock"}, "num-queues": 0},
    {"id": "bad", "node-name": "n0", "addr": {"type": "unix", "path": "TMP/v.sock"}, "num-queues": -1},
    {"id": "bad", "node-name": "n0", "addr": {"type": "unix", "path": "TMP/v.sock"},
     "num-queues": 65536},
    {"id": "bad", "node-name": "ro", "addr": {"type": "unix", "path": "TMP/v.sock"}, "writable": True},
    {"id": "bad", "node-name": "n0", "addr": {"type": "unix", "path": "TMP/v.sock"}, "iothread": "nope"},
    {"id": "bad", "node-name": "nope", "addr": {"type": "unix", "path": "TMP/v.sock"}},
    {"id": "1bad", "node-name": "n0", "addr": {"type": "unix", "path": "TMP/v.sock"}},
    {"id": "exp0", "node-name": "n0", "addr": {"type": "unix", "path": "TMP/v2.sock"}},  # in use
]


def _substitute(value: Any, tmp: str) -> Any:
    if isinstance(value, dict):
        return {key: _substitute(item, tmp) for key, item in value.items()}
    if isinstance(value, str):
        return value.replace("TMP", tmp)
    return value


def _session(proc: Any, tmp_path: Path, name: str) -> dict[str, Any]:
    directory = tmp_path / name
    directory.mkdir()
    tmp = str(directory)
    found: dict[str, Any] = {}
    proc.qmp.command("block-export-add", {"type": "vhost-user-blk", "id": "exp0", "node-name": "n0",
                                          "addr": {"type": "unix", "path": f"{tmp}/exp0.sock"}})
    errors = []
    for options in BAD_EXPORTS:
        reply = proc.qmp.cmd("block-export-add", {"type": "vhost-user-blk", **_substitute(options, tmp)})
        assert "error" in reply, options
        errors.append(f"{reply['error']['class']}: {reply['error']['desc']}".replace(tmp, "TMP"))
    found["errors"] = errors
    found["views"] = [frontend_view(directory / "exp0.sock")]
    proc.qmp.command("block-export-add", {"type": "vhost-user-blk", "id": "exp1", "node-name": "ro",
                                          "addr": {"type": "unix", "path": f"{tmp}/exp1.sock"},
                                          "logical-block-size": 4096, "num-queues": 4})
    found["views"].append(frontend_view(directory / "exp1.sock"))
    proc.qmp.command("block-export-add", {"type": "vhost-user-blk", "id": "exp2", "node-name": "n0",
                                          "addr": {"type": "unix", "path": f"{tmp}/exp2.sock"},
                                          "writable": True})
    found["views"].append(frontend_view(directory / "exp2.sock"))
    proc.qmp.command("block-export-add", {"type": "vhost-user-blk", "id": "exp3", "node-name": "n3",
                                          "addr": {"type": "unix", "path": f"{tmp}/exp3.sock"},
                                          "iothread": "io0", "num-queues": 2})
    found["views"].append(frontend_view(directory / "exp3.sock"))
    found["query"] = proc.qmp.command("query-block-exports")
    # A connected front-end does not keep block-export-del from removing the export.
    with socket.socket(socket.AF_UNIX) as held:
        held.connect(f"{tmp}/exp2.sock")
        _request(held, GET_FEATURES)
        proc.qmp.command("block-export-del", id="exp2")
        event = proc.qmp.event_wait("BLOCK_EXPORT_DELETED", timeout=10)
        found["deleted"] = event["data"]
        held.settimeout(10)
        found["dropped"] = held.recv(1) == b""
    found["socket-after-delete"] = (directory / "exp2.sock").exists()
    reply = proc.qmp.cmd("block-export-del", id="exp2")
    found["delete-again"] = reply["error"]["desc"]
    found["query-after"] = proc.qmp.command("query-block-exports")
    return found


@pytest.mark.requires_qsd
def test_errors_and_frontend_view_match_qsd(tmp_path: Path, daemon: Daemon, qsd: Daemon) -> None:
    args = ("--blockdev", "null-co,node-name=n0,size=67108864",
            "--blockdev", "null-co,node-name=ro,size=3145728,read-only=on",
            "--blockdev", "null-co,node-name=n3,size=1048576",
            "--object", "iothread,id=io0")
    found = {name: _session(factory(*args), tmp_path, name)
             for name, factory in (("blockd", daemon), ("qsd", qsd))}
    assert found["blockd"] == found["qsd"]
    blockd = found["blockd"]
    assert blockd["errors"][:4] == [
        "GenericError: Parameter 'addr' is missing",
        "GenericError: Only socket address types 'unix' and 'fd' are supported",
        "GenericError: Only socket address types 'unix' and 'fd' are supported",
        "GenericError: only QEMU supports file descriptor passing",
    ]
    assert blockd["views"][1]["read-only"] and not blockd["views"][2]["read-only"]
    assert blockd["views"][1]["queue-num"] == 4
    assert blockd["dropped"] and not blockd["socket-after-delete"]


def test_export_on_the_command_line(tmp_path: Path, daemon: Daemon) -> None:
    path = tmp_path / "vhost.sock"
    proc = daemon("--blockdev", "null-co,node-name=n0,size=8388608",
                  "--export", f"type=vhost-user-blk,id=exp0,node-name=n0,addr.type=unix,"
                              f"addr.path={path},writable=on,logical-block-size=4096")
    assert proc.qmp.command("query-block-exports") == [
        {"id": "exp0", "type": "vhost-user-blk", "node-name": "n0", "shutting-down": False}]
    view = frontend_view(path)
    assert not view["read-only"]
    capacity, = struct.unpack_from("<Q", bytes.fromhex(view["config"]), 0)
    block_size, = struct.unpack_from("<I", bytes.fromhex(view["config"]), 20)
    assert (capacity, block_size) == (8 * MiB // 512, 4096)
    # logical-block-size=0 means "not set", as in QEMU. (qemu-storage-daemon 7.2 then shows the
    # guest a block size of 0, which Linux refuses to probe; blockd shows 512.)
    proc.qmp.command("block-export-add", {"type": "vhost-user-blk", "id": "exp1", "node-name": "n0",
                                          "addr": {"type": "unix", "path": str(tmp_path / "v1.sock")},
                                          "logical-block-size": 0})
    block_size, = struct.unpack_from("<I", bytes.fromhex(frontend_view(tmp_path / "v1.sock")["config"]), 20)
    assert block_size == 512



def test_guest_on_an_export_in_an_iothread(tmp_path: Path, daemon: Daemon) -> None:
    """A guest writes and reads through an export whose node is served by an iothread; the data
    is on the image afterwards, and the node can be exported again once the export is gone."""
    guest_or_skip()
    image = tmp_path / "disk.raw"
    original = os.urandom(4 * MiB)
    image.write_bytes(original)
    proc = daemon("--object", "iothread,id=io0",
                  "--blockdev", f"file,node-name=file0,filename={image}")
    sock = tmp_path / "vhost.sock"
    proc.qmp.command("block-export-add", {"type": "vhost-user-blk", "id": "exp0", "node-name": "file0",
                                          "addr": {"type": "unix", "path": str(sock)}, "writable": True,
                                          "iothread": "io0", "fixed-iothread": True, "num-queues": 2})
    data = os.urandom(256 * 1024)
    script = "\n".join([
        "dd if=/data/w of=/dev/vda bs=65536 seek=16 oflag=direct conv=notrunc 2>/dev/null || exit 1",
        "echo written=$(dd if=/dev/vda bs=65536 skip=16 count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)",
        "echo head=$(dd if=/dev/vda bs=65536 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)",
        "",
    ])
    result = run_guest(sock, script, num_queues=2, files={"/data/w": data})
    assert result.status == 0, result
    values = result.values()
    assert values["written"] == hashlib.sha256(data).hexdigest(), result
    assert values["head"] == hashlib.sha256(original[:MiB]).hexdigest(), result
    proc.qmp.command("block-export-del", id="exp0")
    proc.qmp.event_wait("BLOCK_EXPORT_DELETED", timeout=10)
    proc.qmp.command("block-export-add", {"type": "vhost-user-blk", "id": "exp1", "node-name": "file0",
                                          "addr": {"type": "unix", "path": str(sock)}})
    assert proc.stop() == 0, proc.stderr
    assert image.read_bytes() == original[:MiB] + data + original[MiB + len(data):]
