"""blockdev-create and the job commands, against qemu-storage-daemon 7.2 and qemu-img.

* Differential: the same command sequences run on blockd and on qsd give the same replies, the
  same JOB_STATUS_CHANGE sequences and the same query-jobs entries (errors included).
* Images: what blockd creates passes ``qemu-img check`` (no errors, no leaks) and ``qemu-img
  info`` shows the requested options, as for the image ``qemu-img create`` makes with them.
* The Python helper ``blockd.create_image`` over an Engine and over a QMP client.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import blockd
from blockd.testing import QSD, DaemonProcess, qemu_img, qemu_io

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing (qemu-utils)")

requires_qsd = pytest.mark.skipif(not os.access(QSD, os.X_OK), reason=f"{QSD} missing (qemu-system-common)")

# A file system in memory for the job that must still be running when the next command arrives.
SHM = Path("/dev/shm")

Transcript = list[Any]


class Side:
    """One implementation under test: blockd (an Engine in this process) or qsd (a daemon)."""

    def __init__(self, name: str, directory: Path, execute: Callable[[dict[str, Any]], dict[str, Any]],
                 wait: Callable[[dict[str, Any], float], dict[str, Any]]) -> None:
        self.name = name
        self.directory = directory
        self._execute = execute
        self._wait = wait

    def path(self, name: str) -> str:
        return str(self.directory / name)

    def cmd(self, command: str, **arguments: Any) -> dict[str, Any]:
        """The whole reply, with paths of this side's directory written as $DIR."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = {key.replace("_", "-"): value for key, value in arguments.items()}
        return self.normalise(self._execute(request))

    def normalise(self, value: Any) -> Any:
        return json.loads(json.dumps(value).replace(str(self.directory), "$DIR"))

    def statuses(self, job_id: str, until: str) -> list[str]:
        """The statuses job `job_id` reports from now up to and including `until`."""
        seen: list[str] = []
        while not seen or seen[-1] != until:
            event = self._wait({"data": {"id": job_id}}, 30.0)
            seen.append(event["data"]["status"])
        return seen

    def query_job(self, job_id: str) -> Any:
        return [job for job in self.cmd("query-jobs")["return"] if job["id"] == job_id]

    def create(self, job_id: str, options: dict[str, Any]) -> Transcript:
        """blockdev-create, its statuses, its query-jobs entry, job-dismiss and the final status."""
        reply = self.cmd("blockdev-create", job_id=job_id, options=options)
        if "error" in reply:
            return [reply]
        transcript: Transcript = [reply, self.statuses(job_id, "concluded"), self.query_job(job_id)]
        transcript += [self.cmd("job-dismiss", id=job_id), self.statuses(job_id, "null")]
        return transcript


@pytest.fixture(scope="module")
def blockd_side(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Side]:
    directory = tmp_path_factory.mktemp("blockd")
    with blockd.Engine() as engine:
        def wait(match: dict[str, Any], timeout: float) -> dict[str, Any]:
            return engine.events.wait("JOB_STATUS_CHANGE", match=match, timeout=timeout)

        yield Side("blockd", directory, engine.execute, wait)


@pytest.fixture(scope="module")
def qsd_side(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Side]:
    if not os.access(QSD, os.X_OK):
        pytest.skip(f"{QSD} missing (qemu-system-common)")
    directory = tmp_path_factory.mktemp("qsd")
    with DaemonProcess([], command=[QSD], directory=directory) as proc:
        client = proc.qmp
        assert client is not None

        def wait(match: dict[str, Any], timeout: float) -> dict[str, Any]:
            return client.event_wait("JOB_STATUS_CHANGE", timeout=timeout, match=match)

        yield Side("qsd", directory, client.cmd_obj, wait)


@pytest.fixture
def sides(blockd_side: Side, qsd_side: Side) -> list[Side]:
    return [blockd_side, qsd_side]


def same(sides: list[Side], scenario: Callable[[Side], Transcript]) -> Transcript:
    """Runs `scenario` on every side; their transcripts must be equal. Returns blockd's."""
    transcripts = [scenario(side) for side in sides]
    assert transcripts[0] == transcripts[1], f"blockd: {transcripts[0]}\nqsd:    {transcripts[1]}"
    return transcripts[0]


# ---- Differential: jobs and file creation -----------------------------------------------------


@requires_qsd
def test_file_creation_job_sequence(sides: list[Side]) -> None:
    def scenario(side: Side) -> Transcript:
        transcript = side.create("f1", {"driver": "file", "filename": side.path("seq.img"), "size": 1 << 20})
        transcript.append(os.path.getsize(side.path("seq.img")))
        return transcript

    transcript = same(sides, scenario)
    assert transcript[1] == ["created", "running", "waiting", "pending", "concluded"]
    assert transcript[2] == [{"id": "f1", "type": "create", "status": "concluded",
                              "current-progress": 1, "total-progress": 1}]
    assert transcript[4] == ["null"]


FILE_CASES = {
    "missing-directory": {"filename": "nodir/a.img", "size": 1 << 20},
    "directory": {"filename": "", "size": 1 << 20},
    "odd-size": {"filename": "odd.img", "size": 1000},
    "empty": {"filename": "empty.img", "size": 0},
    "metadata": {"filename": "meta.img", "size": 1 << 20, "preallocation": "metadata"},
    "falloc": {"filename": "falloc.img", "size": 1 << 20, "preallocation": "falloc"},
    "full": {"filename": "full.img", "size": 1 << 20, "preallocation": "full"},
    "nocow": {"filename": "nocow.img", "size": 1 << 20, "nocow": True},
    "hint": {"filename": "hint.img", "size": 1 << 20, "extent-size-hint": 0},
    "hint-too-large": {"filename": "hint2.img", "size": 1 << 20, "extent-size-hint": 1 << 33},
    "huge": {"filename": "huge.img", "size": 1 << 63},
}


@requires_qsd
@pytest.mark.parametrize("case", FILE_CASES)
def test_file_creation_options(sides: list[Side], case: str) -> None:
    def scenario(side: Side) -> Transcript:
        options = {"driver": "file", **FILE_CASES[case]}
        options["filename"] = side.path(options["filename"])
        transcript = side.create("f", options)
        path = options["filename"]
        if os.path.isfile(path):
            stat = os.stat(path)
            transcript.append({"size": stat.st_size, "allocated": stat.st_blocks * 512 >= min(stat.st_size, 1 << 20)})
        return transcript

    same(sides, scenario)


@requires_qsd
def test_command_errors(sides: list[Side]) -> None:
    def scenario(side: Side) -> Transcript:
        file_options = {"driver": "file", "filename": side.path("cmd.img"), "size": 1 << 16}
        transcript: Transcript = []
        for driver in ("raw", "null-co", "quorum", "nbd", "blkdebug"):
            transcript.append(side.cmd("blockdev-create", job_id="x", options={"driver": driver}))
        for job_id in ("", "1a", "a b", "#x", "a/b"):
            transcript.append(side.cmd("blockdev-create", job_id=job_id, options=file_options))
        transcript.append(side.cmd("blockdev-create", options=file_options))
        transcript.append(side.cmd("blockdev-create", job_id="x", options={**file_options, "bogus": 1}))
        transcript.append(side.cmd("blockdev-create", job_id="x", options={"driver": "file", "filename": "x"}))
        transcript.append(side.cmd("blockdev-create", job_id="x", options={**file_options, "preallocation": "nope"}))
        transcript.append(side.cmd("query-jobs", x=1))
        for command in ("job-dismiss", "job-finalize", "job-cancel"):
            transcript += [side.cmd(command, id="nope"), side.cmd(command), side.cmd(command, id=5)]
        # A concluded job: its id stays taken until job-dismiss, and only dismiss applies to it.
        transcript.append(side.cmd("blockdev-create", job_id="done", options=file_options))
        transcript.append(side.statuses("done", "concluded"))
        transcript.append(side.cmd("blockdev-create", job_id="done", options=file_options))
        transcript += [side.cmd("job-finalize", id="done"), side.cmd("job-cancel", id="done")]
        transcript += [side.cmd("job-dismiss", id="done"), side.statuses("done", "null")]
        transcript.append(side.cmd("query-jobs"))
        return transcript

    same(sides, scenario)


@requires_qsd
def test_two_jobs_are_listed_newest_first(sides: list[Side]) -> None:
    def scenario(side: Side) -> Transcript:
        transcript: Transcript = []
        for job_id in ("first", "second"):
            options = {"driver": "file", "filename": side.path(job_id + ".img"), "size": 4096}
            transcript += [side.cmd("blockdev-create", job_id=job_id, options=options),
                           side.statuses(job_id, "concluded")]
        transcript.append([job["id"] for job in side.cmd("query-jobs")["return"]])
        for job_id in ("first", "second"):
            transcript += [side.cmd("job-dismiss", id=job_id), side.statuses(job_id, "null")]
        return transcript

    assert same(sides, scenario)[4] == ["second", "first"]


@requires_qsd
@pytest.mark.skipif(not SHM.is_dir(), reason="/dev/shm missing")
def test_verbs_on_a_running_job(sides: list[Side]) -> None:
    """A job busy writing 512 MiB of zeroes accepts cancel but neither dismiss nor finalize."""

    def scenario(side: Side) -> Transcript:
        path = SHM / f"blockd-create-test-{os.getpid()}-{side.name}.img"
        try:
            options = {"driver": "file", "filename": str(path), "size": 512 << 20, "preallocation": "full"}
            transcript = [side.cmd("blockdev-create", job_id="busy", options=options),
                          side.cmd("job-dismiss", id="busy"), side.cmd("job-finalize", id="busy"),
                          side.query_job("busy"), side.cmd("job-cancel", id="busy"),
                          side.statuses("busy", "concluded"), side.query_job("busy"),
                          side.cmd("job-dismiss", id="busy"), side.statuses("busy", "null")]
        finally:
            path.unlink(missing_ok=True)
        return transcript

    transcript = same(sides, scenario)
    assert transcript[1]["error"]["desc"] == "Job 'busy' in state 'running' cannot accept command verb 'dismiss'"
    assert transcript[5] == ["created", "running", "aborting", "concluded"]
    assert transcript[6][0]["error"] == "Operation canceled"


# ---- Differential: qcow2 creation errors --------------------------------------------------


QCOW2_ERRORS = {
    "size-unaligned": {"size": 1000},
    "cluster-not-power": {"cluster-size": 1000},
    "cluster-small": {"cluster-size": 256},
    "cluster-large": {"cluster-size": 4 << 20},
    "refcount-3": {"refcount-bits": 3},
    "refcount-128": {"refcount-bits": 128},
    "refcount-0": {"refcount-bits": 0},
    "v2-refcount-8": {"version": "v2", "refcount-bits": 8},
    "v2-lazy": {"version": "v2", "lazy-refcounts": True},
    "v2-zstd": {"version": "v2", "compression-type": "zstd"},
    "fmt-without-file": {"backing-fmt": "raw"},
    "backing-and-prealloc": {"backing-file": "b.img", "preallocation": "metadata"},
    "extended-l2-small-cluster": {"extended-l2": True, "cluster-size": 4096},
    "extended-l2-v2": {"extended-l2": True, "version": "v2"},
    "data-file-v2": {"data-file": "f0", "version": "v2"},
    "data-file-raw-alone": {"data-file-raw": True},
    "l1-too-large": {"size": 1 << 62},
    "l1-too-large-small-clusters": {"size": 1 << 50, "cluster-size": 512},
    "size-negative": {"size": 1 << 63},
    "size-beyond-maximum": {"size": (1 << 63) - 512},
    "missing-node": {"file": "nosuch"},
    "read-only-node": {"file": "ro"},
    "backing-name-too-long": {"backing-file": "b" * 1024},
}


@requires_qsd
@pytest.mark.parametrize("case", QCOW2_ERRORS)
def test_qcow2_creation_errors(sides: list[Side], case: str) -> None:
    def scenario(side: Side) -> Transcript:
        image = side.path(f"err-{case}.qcow2")
        with open(image, "wb"):
            pass
        assert "error" not in side.cmd("blockdev-add", driver="file", node_name="f0", filename=image)
        assert "error" not in side.cmd("blockdev-add", driver="file", node_name="ro", filename=image,
                                       read_only=True)
        try:
            transcript = side.create("q", {"driver": "qcow2", "file": "f0", "size": 1 << 20, **QCOW2_ERRORS[case]})
        finally:
            side.cmd("blockdev-del", node_name="f0")
            side.cmd("blockdev-del", node_name="ro")
        return transcript

    transcript = same(sides, scenario)
    assert "error" in transcript[2][0], transcript


@requires_qsd
def test_qcow2_creation_on_a_node_defined_in_place(sides: list[Side]) -> None:
    """An inline file definition opens a node for the job only; it is gone afterwards."""

    def scenario(side: Side) -> Transcript:
        image = side.path("inline.qcow2")
        with open(image, "wb"):
            pass
        transcript = side.create("q", {"driver": "qcow2", "size": 1 << 20,
                                       "file": {"driver": "file", "filename": image}})
        transcript.append(side.cmd("query-named-block-nodes"))
        transcript.append(check(image)["check-errors"])
        return transcript

    transcript = same(sides, scenario)
    assert transcript[5] == {"return": []} and transcript[6] == 0


@requires_qsd
def test_qcow2_creation_on_a_node_in_use(sides: list[Side]) -> None:
    """A writable NBD export on a raw node above the file node keeps others from resizing it."""

    def scenario(side: Side) -> Transcript:
        image = side.path("busy.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        socket = side.path("nbd.sock")
        for command, arguments in (
            ("blockdev-add", {"driver": "file", "node-name": "bf", "filename": image}),
            ("blockdev-add", {"driver": "raw", "node-name": "br", "file": "bf"}),
            ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": socket}}}),
            ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "br", "writable": True}),
        ):
            assert "error" not in side.cmd(command, **arguments)
        try:
            # (On "br" itself the conflict names the export, which QEMU calls "an unnamed block
            # device" and blockd "block export 'e0'".)
            return side.create("q", {"driver": "qcow2", "file": "bf", "size": 1 << 20})
        finally:
            side.cmd("block-export-del", id="e0")
            side.cmd("nbd-server-stop")

    same(sides, scenario)



@requires_qsd
def test_qcow2_creation_on_a_node_an_export_took_to_an_iothread(sides: list[Side]) -> None:
    """While an NBD export in an iothread holds the file node, both refuse to create on it (qsd:
    the export does not share resize; blockd: the node cannot get another user there). Once the
    export is gone, both create the image on the same node, and it checks clean."""

    def scenario(side: Side) -> Transcript:
        image = side.path("iothread.qcow2")
        with open(image, "wb"):
            pass
        socket = side.path("iothread-nbd.sock")
        for command, arguments in (
            ("object-add", {"qom-type": "iothread", "id": "create-io"}),
            ("blockdev-add", {"driver": "file", "node-name": "iof", "filename": image}),
            ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": socket}}}),
            ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "iof",
                                  "iothread": "create-io"}),
        ):
            reply = side.cmd(command, **arguments)
            assert "error" not in reply, (side.name, command, reply)
        options = {"driver": "qcow2", "file": "iof", "size": 8 << 20, "cluster-size": 4096,
                   "preallocation": "metadata"}
        try:
            refused = side.create("q1", options)
        finally:
            side.cmd("block-export-del", id="e1")
            side.cmd("nbd-server-stop")
        # The job's error differs in wording: keep whether there was one.
        refused[2] = [{key: ("<error>" if key == "error" else value) for key, value in job.items()}
                      for job in refused[2]]
        created = side.create("q2", options)
        side.cmd("blockdev-del", node_name="iof")
        side.cmd("object-del", id="create-io")
        report = check(image)
        created.append({key: report.get(key, 0) for key in ("check-errors", "corruptions", "leaks")})
        created.append(info(image)["virtual-size"])
        return [refused, created]

    refused, created = same(sides, scenario)
    assert refused[1][-2:] == ["aborting", "concluded"] and refused[2][0]["error"] == "<error>"
    assert created[1][-1] == "concluded" and "error" not in created[2][0]
    assert created[-2:] == [{"check-errors": 0, "corruptions": 0, "leaks": 0}, 8 << 20]

# ---- Images blockd creates, checked with qemu-img ---------------------------------------------


def info(path: str) -> dict[str, Any]:
    return json.loads(qemu_img("info", "--output=json", path).stdout)


def check(path: str) -> dict[str, Any]:
    result = qemu_img("check", "--output=json", path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def qemu_img_options(options: dict[str, Any]) -> list[str]:
    """The qemu-img create -o arguments for BlockdevCreateOptionsQcow2 members."""
    names = {"cluster-size": "cluster_size", "refcount-bits": "refcount_bits", "lazy-refcounts": "lazy_refcounts",
             "backing-file": "backing_file", "backing-fmt": "backing_fmt", "preallocation": "preallocation",
             "compression-type": "compression_type"}
    out = []
    for key, value in options.items():
        if key == "version":
            text = "compat=" + ("0.10" if value == "v2" else "1.1")
        elif isinstance(value, bool):
            text = f"{names[key]}={'on' if value else 'off'}"
        else:
            text = f"{names[key]}={value}"
        out += ["-o", text]
    return out


QCOW2_MATRIX = {
    "default": {},
    "v2": {"version": "v2"},
    "cluster-512": {"cluster-size": 512},
    "cluster-4k": {"cluster-size": 4096},
    "cluster-2m": {"cluster-size": 2 << 20},
    "refcount-1": {"refcount-bits": 1},
    "refcount-8": {"refcount-bits": 8},
    "refcount-64": {"refcount-bits": 64},
    "lazy": {"lazy-refcounts": True},
    "zstd": {"compression-type": "zstd"},
    "backing": {"backing-file": "BACKING", "backing-fmt": "raw"},
    "backing-no-fmt": {"backing-file": "BACKING"},
    "backing-v2-small-cluster": {"backing-file": "BACKING", "backing-fmt": "raw", "version": "v2",
                                 "cluster-size": 512},
    "metadata": {"preallocation": "metadata"},
    "metadata-small-clusters": {"preallocation": "metadata", "cluster-size": 512, "refcount-bits": 2},
    "falloc": {"preallocation": "falloc", "cluster-size": 4096},
    "full": {"preallocation": "full"},
}

# What qemu-img info shows that depends on the options (not on allocation or timing).
INFO_KEYS = ("virtual-size", "cluster-size", "format", "backing-filename", "backing-filename-format")


@pytest.mark.parametrize("size", [0, 64 << 20 | 512, 3 << 30], ids=["empty", "64M+512", "3G"])
@pytest.mark.parametrize("case", QCOW2_MATRIX)
def test_qcow2_images_match_qemu_img(engine: Any, tmp_path: Path, case: str, size: int) -> None:
    options = dict(QCOW2_MATRIX[case])
    if options.get("preallocation") and size > (64 << 20 | 512):
        pytest.skip("preallocating gigabytes adds nothing here")
    backing = tmp_path / "backing.raw"
    backing.write_bytes(b"")
    if "backing-file" in options:
        options["backing-file"] = str(backing)
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    create_with_options(engine, ours, size, options)
    if "backing-file" in options and "backing-fmt" not in options:
        # qemu-img create insists on a backing format (blockdev-create does not): no reference.
        assert check(ours)["check-errors"] == 0
        assert info(ours)["backing-filename"] == str(backing) and "backing-filename-format" not in info(ours)
        return
    qemu_img("create", "-q", "-f", "qcow2", *qemu_img_options(options), theirs, str(size))

    ours_check, theirs_check = check(ours), check(theirs)
    for result in (ours_check, theirs_check):
        assert result.get("corruptions", 0) == 0 and result.get("leaks", 0) == 0 and result["check-errors"] == 0
    for key in ("allocated-clusters", "total-clusters"):
        assert ours_check.get(key) == theirs_check.get(key), key
    ours_info, theirs_info = info(ours), info(theirs)
    for key in INFO_KEYS:
        assert ours_info.get(key) == theirs_info.get(key), key
    assert ours_info["format-specific"] == theirs_info["format-specific"]
    # Where one refcount block covers the whole image and nothing is preallocated, the layout is
    # QEMU's to the byte; beyond that QEMU places further refcount blocks (and preallocated L2
    # tables) in the order its allocator finds room, while blockd packs them.
    cluster_size, refcount_bits = ours_info["cluster-size"], options.get("refcount-bits", 16)
    clusters = -(-os.path.getsize(ours) // cluster_size)
    if not options.get("preallocation") and clusters <= cluster_size * 8 // refcount_bits:
        assert ours_check.get("image-end-offset") == theirs_check.get("image-end-offset")
        assert Path(ours).read_bytes() == Path(theirs).read_bytes()


def create_with_options(engine: Any, path: str, size: int, options: dict[str, Any]) -> None:
    """The two jobs create_image runs, by hand (so that every qcow2 option can be passed)."""
    blockd.blockdev_create(engine, {"driver": "file", "filename": path, "size": 0})
    engine.qmp("blockdev-add", driver="file", node_name="img", filename=path)
    try:
        blockd.blockdev_create(engine, {"driver": "qcow2", "file": "img", "size": size, **options})
    finally:
        engine.qmp("blockdev-del", node_name="img")


def test_created_image_holds_data_and_reads_its_backing_file(engine: Any, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    blockd.create_image(engine, base, "raw", 4 << 20)
    qemu_io("-f", "raw", "-c", "write -P 0x5a 0 1M", str(base))
    top = tmp_path / "top.qcow2"
    blockd.create_image(engine, top, "qcow2", 4 << 20, cluster_size=4096, backing_file=str(base), backing_fmt="raw")
    qemu_io("-f", "qcow2", "-c", "write -P 0xa5 512k 1M", str(top))
    result = qemu_io("-f", "qcow2", "-c", "read -P 0x5a 0 512k", "-c", "read -P 0xa5 512k 1M",
                     "-c", "read -P 0 1536k 2560k", str(top))
    assert "Pattern verification failed" not in result.stdout
    assert check(str(top))["check-errors"] == 0


def test_blockd_opens_what_it_created_on_the_same_file_node(engine: Any, tmp_path: Path) -> None:
    """The usual QMP sequence: create the file, add it, format it, open the format on it."""
    image = tmp_path / "fresh.qcow2"
    blockd.blockdev_create(engine, {"driver": "file", "filename": str(image), "size": 0})
    engine.qmp("blockdev-add", driver="file", node_name="f0", filename=str(image))
    blockd.blockdev_create(engine, {"driver": "qcow2", "file": "f0", "size": 8 << 20, "cluster-size": 4096})
    engine.qmp("blockdev-add", driver="qcow2", node_name="q0", file="f0")
    nodes = {node["node-name"]: node for node in engine.qmp("query-named-block-nodes")}
    assert nodes["q0"]["image"]["virtual-size"] == 8 << 20
    assert nodes["q0"]["image"]["cluster-size"] == 4096
    engine.qmp("blockdev-del", node_name="q0")
    engine.qmp("blockdev-del", node_name="f0")
    assert check(str(image))["check-errors"] == 0


def test_metadata_preallocation_is_sparse_and_reads_zeroes(engine: Any, tmp_path: Path) -> None:
    image = tmp_path / "meta.qcow2"
    blockd.create_image(engine, image, "qcow2", 32 << 20, preallocation="metadata")
    result = check(str(image))
    assert result["allocated-clusters"] == 512
    assert image.stat().st_size >= 32 << 20
    assert image.stat().st_blocks * 512 < 4 << 20  # the data clusters are holes
    mapped = json.loads(qemu_img("map", "--output=json", str(image)).stdout)
    assert all(extent["data"] for extent in mapped)
    assert "Pattern verification failed" not in qemu_io("-c", "read -P 0 0 32M", str(image)).stdout


# ---- Refusals of blockd only, and the engine's life cycle -------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"extended-l2": True}, "Extended L2 entries are not supported by blockd"),
    ({"data-file": "f0"}, "External data files are not supported by blockd"),
    ({"encrypt": {"format": "luks", "key-secret": "s"}}, "Encrypted images are not supported by blockd"),
])
def test_unsupported_qcow2_features_are_refused(engine: Any, tmp_path: Path, options: dict[str, Any],
                                                message: str) -> None:
    image = tmp_path / "refused.qcow2"
    image.write_bytes(b"")
    engine.qmp("blockdev-add", driver="file", node_name="f0", filename=str(image))
    with pytest.raises(blockd.JobFailed) as failure:
        blockd.blockdev_create(engine, {"driver": "qcow2", "file": "f0", "size": 1 << 20, **options})
    assert failure.value.error == message
    assert image.stat().st_size == 0  # refused before anything was written
    assert engine.qmp("query-jobs") == []


def test_pause_resume_complete_are_absent(engine: Any) -> None:
    commands = {entry["name"] for entry in engine.qmp("query-commands")}
    assert {"blockdev-create", "query-jobs", "job-dismiss", "job-finalize", "job-cancel"} <= commands
    assert not {"job-pause", "job-resume", "job-complete"} & commands


@pytest.mark.skipif(not SHM.is_dir(), reason="/dev/shm missing")
def test_closing_the_engine_cancels_a_running_job() -> None:
    path = SHM / f"blockd-create-close-{os.getpid()}.img"
    try:
        engine = blockd.Engine()
        engine.qmp("blockdev-create", job_id="long",
                   options={"driver": "file", "filename": str(path), "size": 4 << 30, "preallocation": "full"})
        started = time.monotonic()
        engine.close()
        assert time.monotonic() - started < 20
        assert path.stat().st_size == 4 << 30 and path.stat().st_blocks * 512 < 4 << 30  # stopped early
    finally:
        path.unlink(missing_ok=True)


# ---- The Python helper ------------------------------------------------------------------------


def test_create_image_raises_the_job_error_and_cleans_up(engine: Any, tmp_path: Path) -> None:
    with pytest.raises(blockd.JobFailed, match="Cluster size must be a power of two between 512 and 2048k"):
        blockd.create_image(engine, tmp_path / "bad.qcow2", "qcow2", 1 << 20, cluster_size=1000)
    assert engine.qmp("query-jobs") == []
    assert engine.qmp("query-named-block-nodes") == []
    assert engine.events.get_all() == []  # the helper consumed its own events
    with pytest.raises(ValueError, match="raw images have no option cluster_size"):
        blockd.create_image(engine, tmp_path / "bad.raw", "raw", 1 << 20, cluster_size=4096)
    with pytest.raises(ValueError, match="cannot create images of format 'vmdk'"):
        blockd.create_image(engine, tmp_path / "bad.vmdk", "vmdk", 1 << 20)


def test_create_image_raw(engine: Any, tmp_path: Path) -> None:
    image = tmp_path / "plain.raw"
    blockd.create_image(engine, image, "raw", 3 << 20, preallocation="falloc")
    assert info(str(image))["virtual-size"] == 3 << 20
    assert image.stat().st_blocks * 512 >= 3 << 20


@requires_qsd
def test_create_image_over_a_qmp_client(qsd: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    """The helper drives qemu-storage-daemon just as well (through blockd.qmp.QMPClient)."""
    proc = qsd()
    image = tmp_path / "by-qsd.qcow2"
    blockd.create_image(proc.qmp, image, "qcow2", 16 << 20, cluster_size=8192, lazy_refcounts=True)
    data = info(str(image))
    assert data["cluster-size"] == 8192 and data["format-specific"]["data"]["lazy-refcounts"] is True
    with pytest.raises(blockd.JobFailed, match="Image size must be a multiple of 512 bytes"):
        blockd.create_image(proc.qmp, image, "qcow2", 1000)
    assert proc.qmp.command("query-jobs") == []
