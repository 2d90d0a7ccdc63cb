#!/usr/bin/env python3
"""Compare blockd-daemon's NBD server with qemu-storage-daemon, qemu-nbd and nbdkit using fio.

Usage (from the repository root, after `./dev build` or `./dev test`):

    .venv/bin/python bench/run.py [--quick] [--reps N] [--runtime S] [--output bench/RESULTS.md]

Each server exports the same 1 GiB raw image in /dev/shm over a unix socket. For every
repetition, every workload and every server in turn, the script starts the server alone on the
image, waits until it answers the NBD greeting, runs fio's nbd engine against it, reads the
server's CPU time from /proc before and after, and stops it. It then writes medians, ratios and
the issue's target check to a Markdown report. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 1 << 30
EXPORT = "disk"  # export name every server answers to
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Peers: the servers a user could pick instead of blockd. Ceilings are not peers.
PEERS = ("qsd", "qemu-nbd", "nbdkit", "nbdkit-t2")


@dataclasses.dataclass(frozen=True)
class Server:
    key: str
    label: str
    argv: Callable[[str, str], list[str]]  # (image path, socket path) -> command line
    note: str


@dataclasses.dataclass(frozen=True)
class Workload:
    key: str
    label: str
    fio_args: tuple[str, ...]


def blockd_daemon() -> str:
    """The blockd-daemon next to the running interpreter (the venv's), else the repo's venv."""
    candidates = [Path(sys.executable).parent / "blockd-daemon", REPO / ".venv/bin/blockd-daemon"]
    for path in candidates:
        if path.exists():
            return str(path)
    sys.exit("bench: blockd-daemon not found; run ./dev build first")


def qsd_style_argv(program: str, image: str, sock: str) -> list[str]:
    return [
        program,
        "--blockdev", f"driver=file,node-name=file0,filename={image}",
        "--blockdev", f"driver=raw,node-name={EXPORT},file=file0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", f"type=nbd,id=export0,node-name={EXPORT},writable=on",
    ]


def null_co_argv(program: str, sock: str) -> list[str]:
    return [
        program,
        "--blockdev", f"driver=null-co,node-name={EXPORT},size={IMAGE_SIZE}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", f"type=nbd,id=export0,node-name={EXPORT},writable=on",
    ]


def make_servers() -> list[Server]:
    blockd = blockd_daemon()
    return [
        Server("blockd", "blockd-daemon (file+raw)",
               lambda img, sock: qsd_style_argv(blockd, img, sock),
               "file + raw nodes, default options (cache.direct=off, i.e. writeback)"),
        Server("qsd", "qemu-storage-daemon (file+raw)",
               lambda img, sock: qsd_style_argv("qemu-storage-daemon", img, sock),
               "same options as blockd: file + raw, cache.direct=off (writeback), aio=threads "
               "(the default), no iothread"),
        Server("qemu-nbd", "qemu-nbd",
               lambda img, sock: ["qemu-nbd", "-f", "raw", "-k", sock, "-x", EXPORT,
                                  "--cache=writeback", "--aio=threads", "--persistent",
                                  "--shared=16", img],
               "--cache=writeback (its default), --aio=threads (its default), --persistent and "
               "--shared=16 so that several fio runs and 4 connections are allowed"),
        Server("nbdkit", "nbdkit file",
               lambda img, sock: ["nbdkit", "-f", "-U", sock, "file", img],
               "file plugin, default threads (16), page cache"),
        Server("nbdkit-t2", "nbdkit file --threads 2",
               lambda img, sock: ["nbdkit", "-f", "--threads", "2", "-U", sock, "file", img],
               "file plugin with --threads 2 (one per core here)"),
        Server("blockd-null", "blockd-daemon (null-co)",
               lambda img, sock: null_co_argv(blockd, sock),
               "null-co node of 1 GiB (read-zeroes off): blockd's client-bound ceiling"),
        Server("nbdkit-null", "nbdkit null",
               lambda img, sock: ["nbdkit", "-f", "-U", sock, "null", str(IMAGE_SIZE)],
               "null plugin, 1 GiB: reference for how fast the client can go"),
    ]


WORKLOADS = [
    Workload("randread-4k-qd1", "4k randread QD1",
             ("--rw=randread", "--bs=4k", "--iodepth=1")),
    Workload("randread-4k-qd32", "4k randread QD32",
             ("--rw=randread", "--bs=4k", "--iodepth=32")),
    Workload("randwrite-4k-qd32", "4k randwrite QD32",
             ("--rw=randwrite", "--bs=4k", "--iodepth=32")),
    Workload("randrw-64k-qd16", "64k randrw 70/30 QD16",
             ("--rw=randrw", "--rwmixread=70", "--bs=64k", "--iodepth=16")),
    Workload("read-1m-qd8", "1M seq read QD8",
             ("--rw=read", "--bs=1M", "--iodepth=8")),
    Workload("write-1m-qd8", "1M seq write QD8",
             ("--rw=write", "--bs=1M", "--iodepth=8")),
    Workload("randread-4k-qd8-4conn", "4k randread QD8 x 4 connections",
             ("--rw=randread", "--bs=4k", "--iodepth=8", "--numjobs=4")),
]


@dataclasses.dataclass
class Run:
    rep: int
    workload: str
    server: str
    ok: bool = False
    iops: float = 0.0
    bw_bytes: float = 0.0
    ios: int = 0
    cpu_seconds: float = 0.0
    elapsed: float = 0.0
    fio_cpu_percent: float = 0.0  # fio's usr+sys, of one core
    steal_percent: float = 0.0  # the hypervisor's steal, percent of all CPU time in the run
    other_percent: float = 0.0  # CPU used by neither the server nor fio, percent of all CPU time
    attempts: int = 1  # measured runs made for this one (see run_steady)
    error: str = ""

    @property
    def cpu_us_per_io(self) -> float:
        return self.cpu_seconds * 1e6 / self.ios if self.ios else float("nan")


# ---------------------------------------------------------------------------------------------
# Server life cycle


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of pid, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    # The command name may contain spaces; fields after ")" start at field 3.
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_jiffies() -> tuple[int, int, int]:
    """(steal, busy, total) time of all CPUs since boot in clock ticks, from /proc/stat; busy is
    user, nice, system, irq and softirq time."""
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = (
            int(x) for x in stat.readline().split()[1:9])
    busy = user + nice + system + irq + softirq
    return steal, busy, busy + idle + iowait + steal


# Processes of keep_awake(): their CPU time is not "other".
AWAKE_PIDS: list[int] = []

# Each spinner dies with the benchmark (PR_SET_PDEATHSIG = 1) and runs only when nothing else
# wants its CPU (SCHED_IDLE).
SPINNER = ("import ctypes, os, signal\n"
           "ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
           "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
           "while True:\n    pass\n")


@contextlib.contextmanager
def keep_awake(enabled: bool):
    """With enabled, one SCHED_IDLE busy loop per CPU for the duration, so that no virtual CPU
    halts. Why: on this machine's hypervisor a halted virtual CPU is woken through the host's
    scheduler, which takes long enough to dominate a request's latency (4k reads at QD1 measured
    5k IOPS halting, 32k awake, for blockd and its peers alike). Common KVM hosts poll a halting
    virtual CPU for a while first (halt_poll_ns) and their guests use the haltpoll cpuidle driver;
    this one has neither (cpuidle driver "none"). The spinners stand in for that polling: they
    take only CPU time that nothing else wants, and their time is left out of "other".
    Off by default: on a quiet host the wake-ups are quick, and the busy loops then cost the
    measured processes something of their own (the host may run the two virtual CPUs on one
    physical core's two threads): one raw child's 1 MiB reads at QD8 gave 2.4-2.8k IOPS awake
    and 3.1-3.3k halting in the same quiet ten minutes. Halting under a busy host shows as
    steal, which run_steady repeats."""
    procs = []
    if enabled:
        for _ in range(os.cpu_count() or 1):
            procs.append(subprocess.Popen([sys.executable, "-c", SPINNER],
                                          stdin=subprocess.DEVNULL))
            AWAKE_PIDS.append(procs[-1].pid)
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            AWAKE_PIDS.remove(proc.pid)


def awake_cpu_seconds() -> float:
    return sum(cpu_seconds(pid) for pid in AWAKE_PIDS)


def children_cpu_seconds() -> float:
    """user + system time of the child processes this process has waited for (fio)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def disturbed(run: Run, max_steal: float, max_other: float) -> bool:
    return run.steal_percent > max_steal or run.other_percent > max_other


def run_steady(measure: Callable[[], Run], max_steal: float, max_other: float,
               retries: int) -> Run:
    """measure() again, up to retries more times, while the run was disturbed: the hypervisor stole
    more than max_steal percent of the CPU, or processes other than the server and fio used more
    than max_other percent (on a shared host steal comes and goes in bursts, and a run that lost a
    third of its CPU compares nothing). Returns the attempt with the least steal and other CPU
    together, or the first that failed; its attempts field counts them all."""
    best = measure()
    attempts = 1
    while best.ok and disturbed(best, max_steal, max_other) and attempts <= retries:
        attempts += 1
        again = measure()
        if (not again.ok or again.steal_percent + again.other_percent
                < best.steal_percent + best.other_percent):
            best = again  # a failed attempt is always the one reported
    best.attempts = attempts
    return best


def wait_until_serving(proc: subprocess.Popen, sock: str, timeout: float = 20.0) -> str:
    """Wait until sock accepts a connection and sends the NBD greeting; '' or an error text."""
    deadline = time.monotonic() + timeout
    last = "socket never appeared"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"server exited with status {proc.returncode} before serving"
        if os.path.exists(sock):
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                    conn.settimeout(2.0)
                    conn.connect(sock)
                    greeting = b""
                    while len(greeting) < 8:
                        chunk = conn.recv(8 - len(greeting))
                        if not chunk:
                            break
                        greeting += chunk
                    if greeting == b"NBDMAGIC":
                        return ""
                    last = f"unexpected greeting {greeting!r}"
            except OSError as error:
                last = str(error)
        time.sleep(0.05)
    return f"not serving after {timeout:.0f} s: {last}"


def stop(proc: subprocess.Popen) -> str:
    """SIGTERM, then SIGKILL after 15 s; returns a note when it did not stop cleanly."""
    if proc.poll() is not None:
        return f"server had already exited with status {proc.returncode}"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "server ignored SIGTERM for 15 s and was killed"
    if proc.returncode not in (0, -signal.SIGTERM, 143):
        return f"server exited with status {proc.returncode} on SIGTERM"
    return ""


def tail(path: Path, limit: int = 1500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-limit:].strip()


def run_one(server: Server, workload: Workload, rep: int, image: str, workdir: Path,
            runtime: int, fio: str, prepare: Callable[[str], str] | None = None,
            timed: bool = True, warmup: int = 0) -> Run:
    """One fio run against a server started alone on image. prepare(socket path) runs once the
    server serves, before fio, and returns an error text or ''. With timed=False fio runs
    without --time_based (the workload must bound itself, e.g. with --io_size) and runtime is only
    the time limit. With warmup > 0, a first fio run of the same workload lasts that many seconds
    and is not measured: the server's CPU time and fio's figures come from the second run only,
    on the same server process (steady state: a server that maps the image has by then mapped
    the pages the workload touches, and every server's caches and threads are set up)."""
    run = Run(rep, workload.key, server.key)
    sock = str(workdir / f"{server.key}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    server_log = workdir / f"{server.key}.{workload.key}.{rep}.server.log"
    with open(server_log, "wb") as log:
        proc = subprocess.Popen(server.argv(image, sock), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        problem = wait_until_serving(proc, sock)
        if problem:
            run.error = f"{problem}; server output: {tail(server_log)}"
            return run
        if prepare and (problem := prepare(sock)):
            run.error = f"{problem}; server output: {tail(server_log)}"
            return run
        uri = f"nbd+unix:///{EXPORT}?socket={sock}"
        fio_json = workdir / f"{server.key}.{workload.key}.{rep}.fio.json"

        def fio_argv(timing: list[str], output: Path) -> list[str]:
            return [fio, "--name=bench", "--ioengine=nbd", f"--uri={uri}", *workload.fio_args,
                    *timing, "--norandommap", "--randrepeat=0",
                    "--group_reporting", "--output-format=json", f"--output={output}"]

        if warmup > 0 and timed:
            warm = subprocess.run(
                fio_argv(["--time_based", f"--runtime={warmup}"], workdir / "warmup.json"),
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=warmup + 60)
            if warm.returncode != 0 or proc.poll() is not None:
                run.error = (f"the warm-up fio run failed (status {warm.returncode}): "
                             f"{warm.stderr.strip()[-1500:]}; server output: {tail(server_log)}")
                return run
        timing = ["--time_based", f"--runtime={runtime}"] if timed else []
        argv = fio_argv(timing, fio_json)
        before = cpu_seconds(proc.pid)
        jiffies = cpu_jiffies()
        fio_before = children_cpu_seconds()
        awake_before = awake_cpu_seconds()
        start = time.monotonic()
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                    text=True, timeout=runtime + 60)
        except subprocess.TimeoutExpired as expired:
            run.error = (f"fio did not finish within {runtime + 60} s (killed); fio output: "
                         f"{(expired.stderr or b'')[-1500:]!r}; server output: {tail(server_log)}")
            return run
        run.elapsed = time.monotonic() - start
        if proc.poll() is not None:
            run.error = (f"server exited with status {proc.returncode} during fio; "
                         f"server output: {tail(server_log)}; fio stderr: "
                         f"{result.stderr.strip()[-1500:]}")
            return run
        run.cpu_seconds = cpu_seconds(proc.pid) - before
        steal, busy, total = (b - a for a, b in zip(jiffies, cpu_jiffies()))
        if total > 0:
            run.steal_percent = 100 * steal / total
            others = (busy / CLOCK_TICKS - run.cpu_seconds - (children_cpu_seconds() - fio_before)
                      - (awake_cpu_seconds() - awake_before))
            run.other_percent = max(0.0, 100 * others / (total / CLOCK_TICKS))
        text = fio_json.read_text(errors="replace") if fio_json.exists() else ""
        try:
            # fio's nbd engine prints "fio: connected to NBD server" before the JSON.
            report = json.loads(text[text.index("{"):])
            job = report["jobs"][0]
        except (ValueError, KeyError, IndexError):
            run.error = (f"fio exited with status {result.returncode} without a JSON report; "
                         f"stderr: {result.stderr.strip()[-1500:]}; stdout: "
                         f"{(result.stdout + text).strip()[-1500:]}")
            return run
        if result.returncode != 0 or job.get("error"):
            run.error = (f"fio exited with status {result.returncode}, job error "
                         f"{job.get('error')}; stderr: {result.stderr.strip()[-1500:]}; "
                         f"server output: {tail(server_log)}")
            return run
        run.iops = job["read"]["iops"] + job["write"]["iops"]
        run.bw_bytes = job["read"]["bw_bytes"] + job["write"]["bw_bytes"]
        run.ios = job["read"]["total_ios"] + job["write"]["total_ios"]
        run.fio_cpu_percent = job.get("usr_cpu", 0.0) + job.get("sys_cpu", 0.0)
        run.ok = run.ios > 0
        if not run.ok:
            run.error = "fio completed no I/O"
        return run
    finally:
        note = stop(proc)
        if note and run.ok:
            run.error = note  # recorded, the measurement itself stands
        elif note:
            run.error += f"; {note}"


# ---------------------------------------------------------------------------------------------
# Image, machine description, report


def make_image(path: Path) -> None:
    """A fully written (not sparse) 1 GiB file of pseudo-random bytes."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as image:
        for index in range(IMAGE_SIZE >> 20):
            # Vary each MiB cheaply so that no two blocks are equal.
            image.write(index.to_bytes(8, "little") + chunk[8:])
        image.flush()
        os.fsync(image.fileno())
    allocated = os.stat(path).st_blocks * 512
    if allocated < IMAGE_SIZE:
        sys.exit(f"bench: {path} is sparse ({allocated} of {IMAGE_SIZE} bytes allocated)")


def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable ({error})"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def machine(fio: str) -> list[tuple[str, str]]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    return [
        ("nproc", str(os.cpu_count())),
        ("CPU", model),
        ("memory", memory),
        ("kernel", platform.release()),
        ("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("blockd-daemon", first_line([blockd_daemon(), "-V"])),
        ("qemu-storage-daemon", first_line(["qemu-storage-daemon", "--version"])),
        ("qemu-nbd", first_line(["qemu-nbd", "--version"])),
        ("nbdkit", first_line(["nbdkit", "--version"])),
        ("fio", first_line([fio, "--version"])),
        ("blockd build", blockd_build()),
    ]


def blockd_build() -> str:
    """Which blockd build the daemon runs: the installed module's time and the tree's commit."""
    venv = Path(blockd_daemon()).parent.parent
    modules = sorted(venv.glob("lib/python*/site-packages/blockd/_core*.so"))
    installed = "unknown"
    if modules:
        mtime = datetime.datetime.fromtimestamp(modules[0].stat().st_mtime, datetime.timezone.utc)
        installed = mtime.strftime("%Y-%m-%d %H:%M UTC")
    commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", ".",
                            ":!bench"], capture_output=True, text=True).stdout.strip()
    tree = f"commit {commit}" + (" plus uncommitted changes" if dirty else "")
    return (f"module installed in {venv.name} at {installed} (RelWithDebInfo, pyproject's "
            f"default); the repository was at {tree} when the run started")


def fmt_count(value: float) -> str:
    if value != value:  # NaN
        return "–"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def fmt_bw(value: float) -> str:
    if value >= 1 << 30:
        return f"{value / (1 << 30):.2f} GiB/s"
    return f"{value / (1 << 20):.0f} MiB/s"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(runs: list[Run], servers: list[Server], workloads: list[Workload], args,
           command: str, started: str, finished: str, desc: list[tuple[str, str]],
           load_end: str) -> str:
    out: list[str] = []
    mode = "quick" if args.quick else "full"
    reps = f"{args.reps} repetition" + ("s" if args.reps != 1 else "")
    out.append("# blockd NBD benchmark results\n")
    out.append(f"Written by `bench/run.py` ({mode} run, {reps} of {args.runtime} s per workload "
               f"and server), {started} to {finished} UTC.\n")
    out.append("Command:\n")
    out.append(f"```sh\n{command}\n```\n")
    out.append("## Machine\n")
    out.append("| | |\n|---|---|")
    for key, value in desc + [("load average at end", load_end)]:
        out.append(f"| {key} | {value} |")
    out.append("")
    out.append(
        f"This machine has only {os.cpu_count()} cores, and other work (builds and test suites of "
        "other engineers) was running on it during the benchmark: fio, the server and that work "
        "share the same cores, so absolute numbers are noisy and mostly bound by fio itself. "
        "Servers were interleaved (for each repetition, each workload, each server in turn) so that "
        "background load spreads over all of them; compare ratios, not absolute values.\n")
    out.append("## Method\n")
    out.append(
        f"- Image: a 1 GiB raw file in /dev/shm, fully written (not sparse); writes go to it. Each "
        "server is started alone on it for one fio run and stopped (SIGTERM) before the next starts.\n"
        f"- Client: `fio --ioengine=nbd --uri=nbd+unix:///{EXPORT}?socket=SOCK --time_based "
        f"--runtime={args.runtime} --norandommap --randrepeat=0 --group_reporting "
        "--output-format=json` plus the workload's options (below). `numjobs=4` opens 4 NBD "
        "connections.\n"
        + (f"- Warm-up: before the measured run, fio runs the same workload for {args.warmup} s "
           "against the same server process, unmeasured (`--warmup`). The figures are the "
           "servers' steady state: first-touch costs (page-table entries of a mapped image, "
           "thread and buffer set-up) fall outside the window for every server.\n"
           if args.warmup > 0 else "- No warm-up: each measured run starts on a fresh server "
           "process.\n") +
        "- IOPS are read + write IOPS; bandwidth is read + write. Server CPU is utime + stime of "
        "the server process (all threads) from /proc/PID/stat around the fio run, divided by the "
        "I/Os fio completed (µs of server CPU per I/O; clock tick "
        f"{1000 / CLOCK_TICKS:.0f} ms, so QD1 numbers are coarse). fio CPU is fio's usr+sys "
        "(percent of one core).\n"
        + ("- Awake: during the benchmark one idle-priority (SCHED_IDLE) busy loop per CPU keeps "
           "the virtual CPUs from halting (`--awake 1`). This machine's hypervisor "
           "wakes a halted virtual CPU through its own scheduler, slowly enough to dominate "
           "request latency for every server (4k reads at QD1: about 5k IOPS halting, 32k awake); "
           "the busy loops stand in for the halt polling of common KVM hosts. They use only CPU "
           "time nothing else wants, and are not counted as other CPU, but they may slow the "
           "measured processes when the host runs both virtual CPUs on one physical core.\n"
           if args.awake else "- Not awake (`--awake 0`, the default): the virtual CPUs halt "
           "when idle.\n") +
        "- Disturbance: steal is the share of all CPU time the hypervisor took from this virtual "
        "machine during the measured run (/proc/stat); other is the share used by neither the "
        "server nor fio (busy time from /proc/stat, less the server's and fio's own). A run with "
        f"more than {args.max_steal:g}% steal or {args.max_other:g}% other was repeated, at most "
        f"{args.retries} more times, and the least disturbed attempt kept (`--max-steal`, "
        "`--max-other`, `--retries`). The steal and other columns are medians over the kept runs; "
        "the summary counts the kept runs still over a limit.\n"
        "- Values are medians over the repetitions; the per-repetition IOPS are listed too.\n"
        "- Target (issue 3): blockd ≥ min(1.2 × best peer, 0.95 × blockd null-co ceiling) IOPS, "
        "with less server CPU per I/O than every peer. Peers: "
        + ", ".join(s.label for s in servers if s.key in PEERS) + ".\n")
    out.append("Servers:\n")
    for server in servers:
        argv = server.argv("IMG", "SOCK")
        shown = " ".join(shlex.quote(a) for a in argv)
        shown = shown.replace(blockd_daemon(), "blockd-daemon")
        out.append(f"- **{server.label}**: `{shown}` — {server.note}")
    out.append("")

    by_key = {(r.workload, r.server): [] for r in runs}
    for r in runs:
        by_key[(r.workload, r.server)].append(r)

    summary: list[str] = []
    failures: list[Run] = [r for r in runs if r.error]
    out.append("## Results\n")
    for workload in workloads:
        out.append(f"### {workload.label}\n")
        out.append(f"fio options: `{' '.join(workload.fio_args)}`\n")
        out.append("| server | IOPS | bandwidth | server CPU µs/IO | server CPU % | fio CPU % "
                   "| steal % | other % | IOPS per repetition | failed runs |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        medians: dict[str, tuple[float, float, float]] = {}
        for server in servers:
            rs = by_key.get((workload.key, server.key), [])
            good = [r for r in rs if r.ok]
            failed = len(rs) - len(good)
            if not good:
                out.append(f"| {server.label} | FAILED | | | | | | | | {failed}/{len(rs)} |")
                continue
            iops = median([r.iops for r in good])
            bw = median([r.bw_bytes for r in good])
            cpu = median([r.cpu_us_per_io for r in good])
            cpu_pct = median([100 * r.cpu_seconds / r.elapsed for r in good if r.elapsed])
            fio_pct = median([r.fio_cpu_percent for r in good])
            steal = median([r.steal_percent for r in good])
            other = median([r.other_percent for r in good])
            medians[server.key] = (iops, bw, cpu)
            per_rep = " / ".join(fmt_count(r.iops) for r in sorted(good, key=lambda r: r.rep))
            out.append(f"| {server.label} | {fmt_count(iops)} | {fmt_bw(bw)} | {cpu:.1f} | "
                       f"{cpu_pct:.0f} | {fio_pct:.0f} | {steal:.0f} | {other:.0f} | {per_rep} | "
                       f"{failed}/{len(rs)} |")
        out.append("")
        peers = {k: v for k, v in medians.items() if k in PEERS}
        line = f"| {workload.label} |"
        if "blockd" in medians and peers:
            best_key = max(peers, key=lambda k: peers[k][0])
            best = peers[best_key][0]
            blockd_iops, _, blockd_cpu = medians["blockd"]
            vs_peer = blockd_iops / best
            ceiling = medians.get("blockd-null", (float("nan"),))[0]
            vs_null = blockd_iops / ceiling if ceiling == ceiling else float("nan")
            vs_null_text = f"{100 * vs_null:.0f}%" if vs_null == vs_null else "–"
            target = min(1.2 * best, 0.95 * ceiling) if ceiling == ceiling else 1.2 * best
            min_peer_cpu = min(v[2] for v in peers.values())
            speed_ok = blockd_iops >= target
            cpu_ok = blockd_cpu < min_peer_cpu
            label = next(s.label for s in servers if s.key == best_key)
            out.append(f"blockd vs best peer ({label}): **{vs_peer:.2f}×**; vs its null-co "
                       f"ceiling: **{vs_null_text}**; target {fmt_count(target)} IOPS: "
                       f"{'met' if speed_ok else 'NOT met'}; CPU/IO {blockd_cpu:.1f} µs vs "
                       f"lowest peer {min_peer_cpu:.1f} µs: {'less' if cpu_ok else 'NOT less'}.\n")
            line += (f" {fmt_count(blockd_iops)} | {label} {fmt_count(best)} | {vs_peer:.2f}× | "
                     f"{vs_null_text} | {'yes' if speed_ok else 'no'} | "
                     f"{blockd_cpu:.1f} vs {min_peer_cpu:.1f} | {'yes' if cpu_ok else 'no'} |")
        else:
            out.append("No comparison: blockd or every peer failed on this workload.\n")
            line += " – | – | – | – | no | – | no |"
        summary.append(line)

    out.append("## Summary against the target\n")
    out.append("| workload | blockd IOPS | best peer IOPS | blockd / best peer | blockd / its null-co "
               "| IOPS target met | CPU µs/IO blockd vs lowest peer | less CPU |")
    out.append("|---|---:|---|---:|---:|---|---|---|")
    out.extend(summary)
    out.append("")
    kept = [r for r in runs if r.ok]
    noisy = [r for r in kept if disturbed(r, args.max_steal, args.max_other)]
    out.append(f"Disturbance: {len(noisy)} of {len(kept)} kept runs had more than "
               f"{args.max_steal:g}% steal or {args.max_other:g}% other CPU (steal median "
               f"{median([r.steal_percent for r in kept]):.0f}%, highest "
               f"{max((r.steal_percent for r in kept), default=0):.0f}%; other median "
               f"{median([r.other_percent for r in kept]):.0f}%, highest "
               f"{max((r.other_percent for r in kept), default=0):.0f}%); "
               f"{sum(r.attempts - 1 for r in runs)} runs were repeated for it. "
               + ("The comparison holds only as far as the servers met the same conditions.\n"
                  if noisy else "\n"))

    out.append("## Anomalies\n")
    anomalies = [line for line in anomaly_lines(by_key, servers, workloads)]
    out.extend(anomalies or ["None: blockd reached at least a quarter of the best peer everywhere."])
    out.append("")

    if args.notes:
        out.append("## Notes from the person who ran it\n")
        out.append(Path(args.notes).read_text().strip() + "\n")

    out.append("## Failures and warnings\n")
    if not failures:
        out.append("None: every run completed without errors.\n")
    else:
        for r in failures:
            kind = "warning" if r.ok else "FAILED"
            out.append(f"- {kind}: repetition {r.rep}, {r.workload}, {r.server}: "
                       f"{r.error.replace(chr(10), ' ')}")
        out.append("")
    return "\n".join(out)


def anomaly_lines(by_key: dict, servers: list[Server], workloads: list[Workload]) -> list[str]:
    """Workloads where blockd is far (under 1/4) below the best peer: a defect, not noise."""
    lines = []
    for workload in workloads:
        def med(key: str) -> float:
            good = [r for r in by_key.get((workload.key, key), []) if r.ok]
            return median([r.iops for r in good])
        peers = [med(s.key) for s in servers if s.key in PEERS]
        peers = [p for p in peers if p == p]
        blockd = med("blockd")
        if peers and blockd == blockd and blockd < max(peers) / 4:
            good = [r for r in by_key.get((workload.key, "blockd"), []) if r.ok]
            cpu = median([r.cpu_us_per_io for r in good])
            lines.append(f"- {workload.label}: blockd reaches {fmt_count(blockd)} IOPS, "
                         f"{blockd / max(peers):.3f}× the best peer, spending {cpu:.0f} µs of server "
                         "CPU per I/O.")
    return lines


def add_condition_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-steal", type=float, default=10.0,
                        help="repeat a measured run in which the hypervisor stole more than this "
                             "percent of the CPU (default 10)")
    parser.add_argument("--max-other", type=float, default=10.0,
                        help="repeat a measured run in which processes other than the server "
                             "and fio used more than this percent of the CPU (default 10)")
    parser.add_argument("--awake", type=int, choices=(0, 1), default=0,
                        help="1: keep every CPU from halting during the benchmark with "
                             "idle-priority busy loops (see keep_awake); 0 (default): let them "
                             "halt")
    parser.add_argument("--retries", type=int, default=2,
                        help="at most this many repeats per run; the least disturbed is kept "
                             "(default 2; 0: never repeat)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s per run instead of 10 s")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--runtime", type=int, help="seconds per fio run (overrides --quick)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="seconds of unmeasured fio on each server before the measured run, "
                             "same workload and server process (default 1; 0: none)")
    add_condition_arguments(parser)
    parser.add_argument("--servers", help="comma-separated subset of: "
                        + ",".join(s.key for s in make_servers()))
    parser.add_argument("--workloads", help="comma-separated subset of: "
                        + ",".join(w.key for w in WORKLOADS))
    parser.add_argument("--output", default=str(REPO / "bench/RESULTS.md"),
                        help="report path (default bench/RESULTS.md)")
    parser.add_argument("--notes", help="Markdown file appended to the report as notes")
    parser.add_argument("--raw", help="also write every run as JSON to this path")
    parser.add_argument("--image", default="/dev/shm/blockd-bench.img",
                        help="image path (default /dev/shm/blockd-bench.img, removed at the end)")
    args = parser.parse_args()
    if args.runtime is None:
        args.runtime = 3 if args.quick else 10
    if args.reps < 1:
        parser.error("--reps must be at least 1")

    fio = shutil.which("fio")
    if not fio:
        sys.exit("bench: fio not found (Debian package fio)")
    servers = make_servers()
    if args.servers:
        wanted = args.servers.split(",")
        servers = [s for s in servers if s.key in wanted]
    workloads = WORKLOADS
    if args.workloads:
        wanted = args.workloads.split(",")
        workloads = [w for w in WORKLOADS if w.key in wanted]
    for server in servers:
        program = server.argv("IMG", "SOCK")[0]
        if not shutil.which(program):
            sys.exit(f"bench: {program} not found")

    command = " ".join(shlex.quote(a) for a in
                       [os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO))
                        else sys.executable, "bench/run.py", *sys.argv[1:]])
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    desc = machine(fio)
    image = Path(args.image)
    print(f"bench: writing {image} (1 GiB)", flush=True)
    make_image(image)
    runs: list[Run] = []
    total = args.reps * len(workloads) * len(servers)
    with tempfile.TemporaryDirectory(prefix="blockd-bench-") as tmp, keep_awake(bool(args.awake)):
        workdir = Path(tmp)
        try:
            for rep in range(1, args.reps + 1):
                for workload in workloads:
                    for server in servers:
                        run = run_steady(
                            lambda: run_one(server, workload, rep, str(image), workdir,
                                            args.runtime, fio, warmup=args.warmup),
                            args.max_steal, args.max_other, args.retries)
                        runs.append(run)
                        status = (f"{fmt_count(run.iops)} IOPS, {fmt_bw(run.bw_bytes)}, "
                                  f"{run.cpu_us_per_io:.1f} µs CPU/IO, {run.steal_percent:.0f}% "
                                  f"steal, {run.other_percent:.0f}% other, attempt {run.attempts}"
                                  if run.ok else "FAILED")
                        print(f"[{len(runs)}/{total}] rep {rep} {workload.key} {server.key}: "
                              f"{status}" + (f" ({run.error[:300]})" if run.error else ""),
                              flush=True)
        except KeyboardInterrupt:
            print("bench: interrupted; writing the report for the runs so far", flush=True)
        finally:
            image.unlink(missing_ok=True)
    finished = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    build_end = blockd_build().split(";")[0]
    if build_end != dict(desc)["blockd build"].split(";")[0]:
        desc.append(("WARNING", "blockd was reinstalled during the run (now "
                     f"{build_end}): blockd's runs mix two builds"))
    text = report(runs, servers, workloads, args, command, started, finished, desc, load_end)
    Path(args.output).write_text(text + "\n")
    if args.raw:
        Path(args.raw).write_text(json.dumps([dataclasses.asdict(r) for r in runs], indent=1))
    print(f"bench: wrote {args.output}", flush=True)
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
