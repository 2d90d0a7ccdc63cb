#!/usr/bin/env python3
"""Compare blockd-daemon's qcow2 driver with qemu-storage-daemon's over NBD, using fio.

Usage (from the repository root, after `./dev build`):

    .venv/bin/python bench/qcow2.py [--runtime S] [--reps N] [--output bench/RESULTS.md]

Three phases, each interleaved over the servers (for every repetition, every workload, every
server in turn), through bench/run.py's run_one (fio's nbd engine on a unix socket, server CPU
from /proc):

- allocated: the NBD workloads on a fully allocated 1 GiB qcow2 image (made by `qemu-img
  convert` from a fully written raw image), with blockd on that raw image as the reference;
- first-write: allocating writes on a new, empty qcow2 image (made by `qemu-img create` before
  every run), a fixed amount of I/O per run;
- snapshot: writes right after `blockdev-snapshot-internal-sync` (sent over QMP before fio starts)
  on a fresh copy of the allocated image, so that they copy shared clusters (copy-on-write), a
  fixed amount of I/O per run.

The report is appended to (or replaces) the "qcow2" section of the output file. Standard library
only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: fio runner, server life cycle, formatting)

SECTION = "## qcow2 over NBD: blockd vs qemu-storage-daemon"
SNAPSHOT = "bench-snap"

ALLOCATED = [
    bench.Workload("randread-4k-qd1", "4k randread QD1", ("--rw=randread", "--bs=4k", "--iodepth=1")),
    bench.Workload("randread-4k-qd32", "4k randread QD32",
                   ("--rw=randread", "--bs=4k", "--iodepth=32")),
    bench.Workload("randwrite-4k-qd32", "4k randwrite QD32",
                   ("--rw=randwrite", "--bs=4k", "--iodepth=32")),
    bench.Workload("randrw-64k-qd16", "64k randrw 70/30 QD16",
                   ("--rw=randrw", "--rwmixread=70", "--bs=64k", "--iodepth=16")),
    bench.Workload("read-1m-qd8", "1M seq read QD8", ("--rw=read", "--bs=1M", "--iodepth=8")),
    bench.Workload("write-1m-qd8", "1M seq write QD8", ("--rw=write", "--bs=1M", "--iodepth=8")),
]
# Fixed amounts of I/O (not time-based), each ending with a flush so that the metadata writes
# the allocations cause are part of the measurement.
FIRST_WRITE = [
    bench.Workload("alloc-randwrite-4k-qd32", "first write: 4k randwrite QD32, 64 MiB",
                   ("--rw=randwrite", "--bs=4k", "--iodepth=32", "--io_size=64M",
                    "--end_fsync=1")),
    bench.Workload("alloc-write-1m-qd8", "first write: 1M seq write QD8, 512 MiB",
                   ("--rw=write", "--bs=1M", "--iodepth=8", "--io_size=512M", "--end_fsync=1")),
]
AFTER_SNAPSHOT = [
    bench.Workload("cow-randwrite-4k-qd32", "after snapshot: 4k randwrite QD32, 64 MiB",
                   ("--rw=randwrite", "--bs=4k", "--iodepth=32", "--io_size=64M",
                    "--end_fsync=1")),
    bench.Workload("cow-randwrite-64k-qd16", "after snapshot: 64k randwrite QD16, 256 MiB",
                   ("--rw=randwrite", "--bs=64k", "--iodepth=16", "--io_size=256M",
                    "--end_fsync=1")),
]


def daemon_argv(program: list[str], image: str, sock: str, fmt: str) -> list[str]:
    """qemu-storage-daemon-style options: file + fmt nodes, an NBD export and a QMP socket."""
    return [
        *program,
        "--blockdev", f"driver=file,node-name=file0,filename={image}",
        "--blockdev", f"driver={fmt},node-name={bench.EXPORT},file=file0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", f"type=nbd,id=export0,node-name={bench.EXPORT},writable=on",
        "--chardev", f"socket,id=qmp0,path={sock}.qmp,server=on,wait=off",
        "--monitor", "chardev=qmp0",
    ]


def qmp_command(path: str, command: str, arguments: dict, timeout: float = 30.0) -> str:
    """Sends one QMP command over the monitor socket at path; '' on success, else the error."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(path)
            stream = conn.makefile("rwb")

            def call(name: str, args: dict) -> dict:
                stream.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
                stream.flush()
                while True:  # skip greetings and events
                    line = stream.readline()
                    if not line:
                        raise OSError("monitor closed the connection")
                    reply = json.loads(line)
                    if "return" in reply or "error" in reply:
                        return reply

            reply = call("qmp_capabilities", {})
            if "error" not in reply:
                reply = call(command, arguments)
            return f"{command}: {reply['error']}" if "error" in reply else ""
    except (OSError, ValueError) as error:
        return f"{command}: {error}"


def take_snapshot(sock: str) -> str:
    return qmp_command(f"{sock}.qmp", "blockdev-snapshot-internal-sync",
                       {"device": bench.EXPORT, "name": SNAPSHOT})


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, stdout=subprocess.DEVNULL)


@dataclasses.dataclass(frozen=True)
class Phase:
    key: str
    title: str
    workloads: list[bench.Workload]
    servers: list[bench.Server]
    timed: bool
    # (server, run directory) -> image path to give to the server, made fresh if needed
    image: Callable[[bench.Server, Path], str]
    prepare: Callable[[str], str] | None = None


def check_image(path: str) -> str:
    """'' if `qemu-img check` finds no errors in a qcow2 image, else its output."""
    out = subprocess.run(["qemu-img", "check", "-f", "qcow2", path], capture_output=True,
                         text=True)
    return "" if out.returncode == 0 else (out.stdout + out.stderr).strip()[-500:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", type=int, default=3,
                        help="seconds per time-based fio run (default 3)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--phases", default="allocated,first-write,snapshot",
                        help="comma-separated subset of allocated,first-write,snapshot")
    parser.add_argument("--workloads", help="comma-separated subset of workload keys")
    parser.add_argument("--blockd", default=None,
                        help="blockd-daemon command line (default: the venv's blockd-daemon)")
    parser.add_argument("--baseline", default=None,
                        help="another blockd-daemon command line (e.g. an older build) to run "
                        "as a fourth server, 'blockd before'")
    parser.add_argument("--dir", default="/dev/shm", help="where the images go (default /dev/shm)")
    parser.add_argument("--output", default=str(bench.REPO / "bench/RESULTS.md"),
                        help="Markdown file whose qcow2 section is written (default "
                        "bench/RESULTS.md); '-' prints the section")
    parser.add_argument("--raw", help="also write every run as JSON to this path")
    parser.add_argument("--lock", help="hold flock on this file during each repetition (and "
                        "release it in between), so that benchmarks of others do not overlap")
    args = parser.parse_args()
    fio = shutil.which("fio")
    if not fio:
        sys.exit("bench: fio not found (Debian package fio)")
    for tool in ("qemu-img", "qemu-storage-daemon"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found")
    blockd = shlex.split(args.blockd) if args.blockd else [bench.blockd_daemon()]
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())

    base = Path(args.dir) / f"blockd-qcow2-bench-{os.getpid()}"
    raw_image = Path(f"{base}.raw")
    allocated = Path(f"{base}.qcow2")

    def qcow2_server(key: str, label: str, program: list[str]) -> bench.Server:
        return bench.Server(key, label, lambda img, sock: daemon_argv(program, img, sock, "qcow2"),
                            "file + qcow2 nodes, default qcow2 options and cache sizes")

    blockd_q = qcow2_server("blockd", "blockd qcow2", blockd)
    qsd_q = qcow2_server("qsd", "qsd qcow2", ["qemu-storage-daemon"])
    extra = ([qcow2_server("blockd-before", "blockd qcow2 (before)", shlex.split(args.baseline))]
             if args.baseline else [])
    blockd_raw = bench.Server("blockd-raw", "blockd raw",
                              lambda img, sock: daemon_argv(blockd, str(raw_image), sock, "raw"),
                              "file + raw nodes on the raw image the qcow2 image was made from")

    def fresh_empty(server: bench.Server, workdir: Path) -> str:
        path = workdir / "empty.qcow2"
        path.unlink(missing_ok=True)
        qemu_img("create", "-f", "qcow2", str(path), str(bench.IMAGE_SIZE))
        return str(path)

    def fresh_copy(server: bench.Server, workdir: Path) -> str:
        path = workdir / "snap.qcow2"
        shutil.copyfile(allocated, path)
        return str(path)

    phases = [
        Phase("allocated", "NBD workloads on a fully allocated image", ALLOCATED,
              [blockd_q, qsd_q, blockd_raw, *extra], True, lambda server, workdir: str(allocated)),
        Phase("first-write", "first-write allocation on an empty image", FIRST_WRITE,
              [blockd_q, qsd_q, *extra], False, fresh_empty),
        Phase("snapshot", "writes right after an internal snapshot (copy-on-write)",
              AFTER_SNAPSHOT, [blockd_q, qsd_q, *extra], False, fresh_copy, take_snapshot),
    ]
    qcow2_servers = [blockd_q, qsd_q, *extra]
    wanted = args.phases.split(",")
    phases = [p for p in phases if p.key in wanted]
    if args.workloads:
        keys = args.workloads.split(",")
        phases = [dataclasses.replace(p, workloads=[w for w in p.workloads if w.key in keys])
                  for p in phases]

    print(f"bench: writing {raw_image} and {allocated} (1 GiB each)", flush=True)
    bench.make_image(raw_image)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw_image), str(allocated))
    runs: list[tuple[str, bench.Run]] = []
    check_failures: list[str] = []

    def one_run(rep: int, phase: Phase, workload: bench.Workload, server: bench.Server,
                workdir: Path) -> None:
        image = phase.image(server, workdir)
        run = bench.run_one(server, workload, rep, image, workdir,
                            args.runtime if phase.timed else 120, fio,
                            prepare=phase.prepare, timed=phase.timed)
        runs.append((phase.key, run))
        if server in qcow2_servers and (problem := check_image(image)):
            check_failures.append(f"{phase.key} {workload.key} {server.key} rep {rep}: {problem}")
        status = (f"{bench.fmt_count(run.iops)} IOPS, {bench.fmt_bw(run.bw_bytes)}, "
                  f"{run.cpu_us_per_io:.1f} µs CPU/IO" if run.ok else "FAILED")
        print(f"rep {rep} {phase.key} {workload.key} {server.key}: {status}"
              + (f" ({run.error[:300]})" if run.error else ""), flush=True)

    try:
        with tempfile.TemporaryDirectory(prefix="blockd-qcow2-bench-", dir=args.dir) as tmp:
            for rep in range(1, args.reps + 1):
                with repetition_lock(args.lock):
                    for phase in phases:
                        for workload in phase.workloads:
                            for server in phase.servers:
                                one_run(rep, phase, workload, server, Path(tmp))
    except KeyboardInterrupt:
        print("bench: interrupted; writing the report for the runs so far", flush=True)
    finally:
        raw_image.unlink(missing_ok=True)
        allocated.unlink(missing_ok=True)
    finished = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    command = " ".join(shlex.quote(a) for a in ["python", "bench/qcow2.py", *sys.argv[1:]])
    text = report(runs, phases, args, command, started, finished, load_start, load_end, blockd,
                  fio, check_failures, bool(extra))
    if args.output == "-":
        print(text)
    else:
        write_section(Path(args.output), text)
        print(f"bench: wrote the qcow2 section of {args.output}", flush=True)
    if args.raw:
        Path(args.raw).write_text(json.dumps(
            [dict(phase=phase, **dataclasses.asdict(r)) for phase, r in runs], indent=1))
    return 0 if all(r.ok for _, r in runs) and not check_failures else 1


@contextlib.contextmanager
def repetition_lock(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_section(path: Path, section: str) -> None:
    """Replaces the qcow2 section of path (from its heading to the next '## ' heading that is
    not part of it, or the end) or appends it."""
    text = path.read_text() if path.exists() else ""
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        match = re.compile(r"^## (?!qcow2)", re.M).search(text, start + len(SECTION))
        end = match.start() if match else len(text)
        text = text[:start] + section + "\n" + ("\n" + text[end:] if match else "")
    path.write_text(text)


def report(runs: list[tuple[str, bench.Run]], phases: list[Phase], args, command: str,
           started: str, finished: str, load_start: str, load_end: str, blockd: list[str],
           fio: str, check_failures: list[str], baseline: bool) -> str:
    out = [f"{SECTION} ({started} UTC)\n"]
    out.append(f"Written by `bench/qcow2.py`, {started} to {finished} UTC, {args.reps} "
               f"repetitions; time-based runs last {args.runtime} s. Command:\n")
    out.append(f"```sh\n{command}\n```\n")
    desc = dict(bench.machine(fio))
    out.append(f"Machine: {desc['nproc']} cores ({desc['CPU']}), {desc['memory']}, kernel "
               f"{desc['kernel']}; load average {load_start} at the start, {load_end} at the end "
               "(other engineers' builds and tests share the cores: compare ratios). "
               f"{desc['qemu-storage-daemon']}; {desc['fio']}; blockd-daemon: "
               f"`{' '.join(blockd)}` at commit "
               f"{bench.first_line(['git', '-C', str(bench.REPO), 'rev-parse', '--short', 'HEAD'])}"
               ".\n")
    out.append(
        "Method: both daemons get the same options, `--blockdev driver=file,node-name=file0,"
        "filename=IMG --blockdev driver=qcow2,node-name=disk,file=file0 --nbd-server "
        "addr.type=unix,addr.path=SOCK --export type=nbd,id=export0,node-name=disk,writable=on` "
        "plus a QMP monitor: default qcow2 options and cache sizes (no l2-cache-size or "
        "refcount-cache-size given; both caches cover the whole 1 GiB image), cache.direct=off, "
        "no iothread. Images are qcow2 v3 (compat 1.1) with 64 KiB clusters in /dev/shm: the "
        "allocated image is `qemu-img convert -O qcow2` of a fully written 1 GiB raw image (every "
        "cluster allocated, in guest order, no preallocation option); blockd raw serves that raw "
        "image. First-write runs get a new `qemu-img create -f qcow2 IMG 1G` each; after-snapshot "
        "runs a fresh copy of the allocated image on which `blockdev-snapshot-internal-sync "
        f"device=disk name={SNAPSHOT}` is sent before fio starts. fio: `--ioengine=nbd "
        "--norandommap --randrepeat=0` plus the options shown; first-write and after-snapshot "
        "runs transfer a fixed amount and end with a flush (`--end_fsync=1`), so their metadata "
        "writes count. Values are medians over the repetitions (each server started alone per "
        "run, servers interleaved); server CPU is utime+stime from /proc per completed I/O. "
        "Every qcow2 image was checked with `qemu-img check` after each run.\n")

    by_key: dict[tuple[str, str, str], list[bench.Run]] = {}
    for phase, r in runs:
        by_key.setdefault((phase, r.workload, r.server), []).append(r)

    def med(phase: str, workload: str, server: str, attr: str) -> float:
        good = [r for r in by_key.get((phase, workload, server), []) if r.ok]
        return bench.median([getattr(r, attr) for r in good])

    shown = ("blockd", "qsd", "blockd-raw") + (("blockd-before",) if baseline else ())
    before = " | blockd qcow2 before" if baseline else ""
    out.append(f"| workload | blockd qcow2 | qsd qcow2 | blockd raw{before} | blockd / qsd | "
               "blockd qcow2 / raw | CPU µs/IO " + " / ".join(shown) + " | IOPS per rep blockd; "
               "qsd |")
    out.append("|---|---:|---:|---:" + ("|---:" if baseline else "") + "|---:|---:|---|---|")
    verdicts = []
    for phase in phases:
        for workload in phase.workloads:
            cells = []
            values = {}
            for server in shown:
                iops = med(phase.key, workload.key, server, "iops")
                bw = med(phase.key, workload.key, server, "bw_bytes")
                values[server] = iops
                cells.append("–" if iops != iops else
                             f"{bench.fmt_count(iops)} ({bench.fmt_bw(bw)})")
            vs_qsd = values["blockd"] / values["qsd"] if values["qsd"] else float("nan")
            vs_raw = (values["blockd"] / values["blockd-raw"]
                      if values["blockd-raw"] == values["blockd-raw"] else float("nan"))
            cpu = " / ".join(
                "–" if (c := med(phase.key, workload.key, s, "cpu_us_per_io")) != c else f"{c:.1f}"
                for s in shown)
            per_rep = "; ".join(
                " / ".join(bench.fmt_count(r.iops) for r in by_key.get(
                    (phase.key, workload.key, s), []) if r.ok) for s in ("blockd", "qsd"))
            out.append(f"| {workload.label} | {' | '.join(cells)} | {vs_qsd:.2f} | "
                       + ("–" if vs_raw != vs_raw else f"{100 * vs_raw:.0f}%")
                       + f" | {cpu} | {per_rep} |")
            ahead = vs_qsd > 1.0
            verdict = f"- {workload.label}: ahead of qsd: {'yes' if ahead else 'NO'}"
            if vs_raw == vs_raw:
                verdict += f"; within 10% of raw: {'yes' if vs_raw >= 0.9 else 'NO'}"
            verdicts.append(verdict)
    out.append("")
    out.append("fio options: " + "; ".join(
        f"{w.key} `{' '.join(w.fio_args)}`" for p in phases for w in p.workloads) + ".\n")
    out.append("Target (issue 4): blockd ahead of qemu-storage-daemon on every workload, and "
               "within 10% of blockd's own raw numbers on the allocated image.\n")
    out.extend(verdicts)
    out.append("")
    failures = [(p, r) for p, r in runs if r.error]
    if failures or check_failures:
        out.append("Failures and warnings:\n")
        for phase, r in failures:
            out.append(f"- {'warning' if r.ok else 'FAILED'}: rep {r.rep} {phase} {r.workload} "
                       f"{r.server}: {r.error.replace(chr(10), ' ')[:600]}")
        for line in check_failures:
            out.append(f"- qemu-img check: {line}")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
