"""Quorum over NBD children: each child of a 3-way quorum is an nbd node served by another process
(two blockd daemons and qemu-nbd), on unix sockets or, across "hosts", on TCP addresses that exist
only inside network namespaces the test creates.

The engine under test exports the quorum over NBD; a libnbd workload writes and reads back through
it while one child's server is killed. The workload must finish without an error, the engine must
report the lost child with QUORUM_REPORT_BAD, and the images of the surviving children must hold
exactly what was written (checked with qemu-img compare and by reading the files).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

import blockd
from blockd.testing import create_image, pattern
from blockd.testing.clients import import_libnbd
from blockd.testing.nbd_servers import Server, Workload, compare, qemu_nbd
from blockd.testing.process import blockd_command, blockd_env

nbd = import_libnbd()
pytestmark = [
    pytest.mark.skipif(nbd is None, reason="python3-libnbd (module nbd) is not installed"),
    pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd missing (qemu-utils)"),
]

MiB = 1 << 20
SIZE = 8 * MiB
REGION = 1 * MiB  # the workload writes 64 blocks of 64 KiB from here


def blockd_server(image: Path, endpoint: Path | tuple[str, int], netns: str | None = None) -> Server:
    """A blockd daemon exporting the raw `image` writable as "exp"."""
    if isinstance(endpoint, tuple):
        address = f"addr.type=inet,addr.host={endpoint[0]},addr.port={endpoint[1]}"
    else:
        address = f"addr.type=unix,addr.path={endpoint}"
    argv = [*blockd_command(), "--blockdev", f"file,node-name=f0,filename={image}",
            "--nbd-server", address, "--export", "nbd,id=e0,node-name=f0,name=exp,writable=on"]
    return Server(argv, endpoint, netns, env=blockd_env())


class QuorumOverNbd:
    """Three servers, an engine with a quorum of three nbd children ("c0".."c2") and its export."""

    def __init__(self, directory: Path, servers: list[Server], images: list[Path]) -> None:
        self.servers = servers
        self.images = images
        self.engine = blockd.Engine()
        self.socket = directory / "quorum.sock"
        for server in servers:
            server.start()
        children = [{"driver": "nbd", "node-name": f"c{index}", "server": server.address(), "export": "exp"}
                    for index, server in enumerate(servers)]
        try:
            self.engine.qmp("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 2,
                                             "children": children})
        except blockd.ExecuteError as error:
            if "quorum" in error.desc and "not supported" in error.desc:
                self.close()
                pytest.skip(f"blockd has no quorum driver yet ({error.desc})")
            raise
        self.engine.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(self.socket)}})
        self.engine.qmp("block-export-add", type="nbd", id="q", node_name="q", name="q", writable=True)
        self.uri = f"nbd+unix:///q?socket={self.socket}"

    def reports(self) -> list[dict[str, Any]]:
        return [event["data"] for event in self.engine.events.get_all() if event["event"] == "QUORUM_REPORT_BAD"]

    def close(self) -> None:
        self.engine.close()
        for server in self.servers:
            server.kill()


def make_images(directory: Path) -> list[Path]:
    images = []
    for index in range(3):
        image = directory / f"child{index}.raw"
        create_image(image, SIZE)
        with open(image, "r+b") as f:
            f.write(pattern(0, REGION, seed=9))
        images.append(image)
    return images


def kill_one_during_workload(quorum: QuorumOverNbd, victim: int) -> None:
    workload = Workload(quorum.uri, REGION)
    workload.start()
    try:
        workload.rounds_after(10)
        quorum.servers[victim].kill()
        workload.rounds_after(80)  # more than the 64 blocks: every block is rewritten after the loss
    finally:
        workload.stop_event.set()
        workload.join(30)
    assert workload.errors == [], workload.errors
    assert workload.rounds >= 90

    # The loss is reported, for the victim only, with the error it caused.
    deadline = time.monotonic() + 5
    reports: list[dict[str, Any]] = []
    while not reports and time.monotonic() < deadline:
        reports = quorum.reports()
        time.sleep(0.02)
    assert reports, "no QUORUM_REPORT_BAD after a child's server died"
    assert {report["node-name"] for report in reports} == {f"c{victim}"}
    assert all("error" in report and report["type"] in ("read", "write", "flush") for report in reports)

    # The survivors hold what the workload wrote last: identical images, and the last round's data.
    quorum.engine.qmp("block-export-del", id="q")
    survivors = [image for index, image in enumerate(quorum.images) if index != victim]
    compare(survivors[0], survivors[1])
    last = workload.rounds - 1
    offset = REGION + (last % 64) * 65536
    with open(survivors[0], "rb") as f:
        f.seek(offset)
        assert f.read(65536) == pattern(offset, 65536, last)
        f.seek(0)
        assert f.read(REGION) == pattern(0, REGION, seed=9)


@pytest.fixture
def quorum_local(tmp_path: Path) -> Iterator[QuorumOverNbd]:
    images = make_images(tmp_path)
    servers = [blockd_server(images[0], tmp_path / "s0.sock"),
               blockd_server(images[1], tmp_path / "s1.sock"),
               qemu_nbd(images[2], tmp_path / "s2.sock")]
    quorum = QuorumOverNbd(tmp_path, servers, images)
    yield quorum
    quorum.close()


@pytest.mark.parametrize("victim", [pytest.param(1, id="blockd-child"), pytest.param(2, id="qemu-nbd-child")])
def test_kill_child_server_during_workload(quorum_local: QuorumOverNbd, victim: int) -> None:
    kill_one_during_workload(quorum_local, victim)


# ---- Across hosts: children in network namespaces.


class Namespaces:
    """Network namespaces, each joined to this one by a veth pair on its own /30; the server
    address (the .2 of the pair) exists only inside its namespace."""

    def __init__(self, count: int) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.names: list[str] = []
        self.links: list[str] = []
        self.addresses: list[str] = []
        try:
            for index in range(count):
                self._add(index)
        except subprocess.CalledProcessError as error:
            self.close()
            pytest.skip(f"cannot create network namespaces here: {' '.join(error.cmd)} failed: "
                        f"{error.stderr.strip()}")

    def _add(self, index: int) -> None:
        name = f"bq{self.tag}{index}"
        host, inside = f"bqh{self.tag}{index}", f"bqn{self.tag}{index}"
        subnet = 64 + index  # 10.231.<subnet>.0/30
        here, there = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
        run("ip", "netns", "add", name)
        self.names.append(name)
        run("ip", "link", "add", host, "type", "veth", "peer", "name", inside)
        self.links.append(host)
        run("ip", "link", "set", inside, "netns", name)
        run("ip", "addr", "add", f"{here}/30", "dev", host)
        run("ip", "link", "set", host, "up")
        run("ip", "netns", "exec", name, "ip", "addr", "add", f"{there}/30", "dev", inside)
        run("ip", "netns", "exec", name, "ip", "link", "set", inside, "up")
        run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        self.addresses.append(there)

    def close(self) -> None:
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    if shutil.which("ip") is None:
        pytest.skip("the ip tool (iproute2) is not installed")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)")
    spaces = Namespaces(3)
    yield spaces
    spaces.close()


def test_children_on_other_hosts(tmp_path: Path, namespaces: Namespaces) -> None:
    images = make_images(tmp_path)
    port = 10809
    servers = [blockd_server(images[0], (namespaces.addresses[0], port), namespaces.names[0]),
               blockd_server(images[1], (namespaces.addresses[1], port), namespaces.names[1]),
               qemu_nbd(images[2], (namespaces.addresses[2], port), netns=namespaces.names[2])]
    quorum = QuorumOverNbd(tmp_path, servers, images)
    try:
        nodes = {node["node-name"]: node for node in quorum.engine.qmp("query-named-block-nodes")}
        assert nodes["c0"]["file"] == f"nbd://{namespaces.addresses[0]}:{port}/exp"
        kill_one_during_workload(quorum, victim=0)
    finally:
        quorum.close()
