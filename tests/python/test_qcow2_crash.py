"""Crash safety of qcow2: kill -9 the daemon at a random point of a write + snapshot + delete
workload, then ``qemu-img check``: no corruption in any trial (leaked clusters are allowed and
``qemu-img check -r leaks`` repairs them), and every write acknowledged before a completed flush
(and not written again since) reads back intact.

Trials: BLOCKD_QCOW2_CRASH_TRIALS (default 4; the seed of trial i is BLOCKD_QCOW2_CRASH_SEED + i).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from blockd.testing.images import qemu_img
from blockd.testing.process import DaemonProcess

nbd = pytest.importorskip("nbd")

TRIALS = int(os.environ.get("BLOCKD_QCOW2_CRASH_TRIALS", "4"))
FIRST_SEED = int(os.environ.get("BLOCKD_QCOW2_CRASH_SEED", "1"))
BLOCK = 24 * 1024  # deliberately not cluster aligned: partial-cluster copy-on-write
BLOCKS = 160


def block_data(block: int, version: int) -> bytes:
    return bytes([(block * 7 + version * 13) % 251 + 1]) * BLOCK


def check_report(image: Path) -> dict[str, int]:
    # The killed daemon's io_uring instance is torn down by the kernel after the process is gone
    # and holds the image file (and its lock) until then: retry while the lock is still taken.
    deadline = time.monotonic() + 10
    while True:
        result = qemu_img("check", "--output=json", str(image), check=False)
        if "lock" not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert result.stdout, result.stderr
    report: dict[str, int] = json.loads(result.stdout)
    return report


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + TRIALS))
def test_kill_during_writes_and_snapshots(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    image = tmp_path / "crash.qcow2"
    cluster = rng.choice(["4k", "64k"])
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster}", str(image), str(BLOCK * BLOCKS))
    socket = tmp_path / "nbd.sock"
    proc = DaemonProcess(
        [
            "--blockdev", json.dumps({"driver": "qcow2", "node-name": "disk", "discard": "unmap",
                                      "file": {"driver": "file", "filename": str(image)}}),
            "--nbd-server", f"addr.type=unix,addr.path={socket}",
            "--export", "type=nbd,id=exp,node-name=disk,writable=on",
        ],
        directory=tmp_path,
    ).start()
    assert proc.qmp is not None
    handle = nbd.NBD()
    handle.connect_uri(f"nbd+unix:///disk?socket={socket}")

    durable: dict[int, bytes] = {}  # block -> content acknowledged by a completed flush
    pending: dict[int, bytes] = {}  # written since the last completed flush
    killed = threading.Event()

    def killer() -> None:
        killed.wait(rng.uniform(0.05, 1.5))
        proc.proc.kill()  # type: ignore[union-attr]
        killed.set()

    thread = threading.Thread(target=killer)
    thread.start()
    snapshots: list[str] = []
    step = 0
    try:
        while not killed.is_set() and step < 100000:
            step += 1
            choice = rng.random()
            block = rng.randrange(BLOCKS)
            # A write counts as pending from the moment it is sent: the kill may land after the
            # daemon applied it but before the reply arrived.
            if choice < 0.6:
                data = block_data(block, step)
                pending[block] = data
                handle.pwrite(data, block * BLOCK)
            elif choice < 0.7:
                pending[block] = bytes(BLOCK)
                handle.zero(BLOCK, block * BLOCK)
            elif choice < 0.85:
                handle.flush()
                durable.update(pending)
                pending.clear()
            elif choice < 0.93 or not snapshots:
                name = f"s{step}"
                proc.qmp.command("blockdev-snapshot-internal-sync", device="disk", name=name)
                snapshots.append(name)
            else:
                victim = snapshots.pop(rng.randrange(len(snapshots)))
                proc.qmp.command("blockdev-snapshot-delete-internal-sync", device="disk", name=victim)
    except Exception:
        if not killed.is_set():
            raise
    finally:
        killed.set()
        thread.join()
        proc.wait(30)
        proc.close()

    report = check_report(image)
    assert report.get("corruptions", 0) == 0, qemu_img("check", str(image), check=False).stderr
    assert report.get("check-errors", 0) == 0, report
    if report.get("leaks", 0):
        qemu_img("check", "-r", "leaks", str(image), check=False)
        repaired = check_report(image)
        assert repaired.get("leaks", 0) == 0 and repaired.get("corruptions", 0) == 0, repaired

    # Flushed writes not written again afterwards are intact.
    raw = tmp_path / "after.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    content = raw.read_bytes()
    for block, data in durable.items():
        if block in pending:
            continue
        assert content[block * BLOCK:(block + 1) * BLOCK] == data, f"block {block} (seed {seed})"
