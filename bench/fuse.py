#!/usr/bin/env python3
"""Compare blockd-daemon's FUSE export with qemu-storage-daemon's and with the image file itself.

Usage (from the repository root, after `./dev build` or `./dev test`):

    .venv/bin/python bench/fuse.py [--quick] [--reps N] [--runtime S] [--output bench/RESULTS.md]

Both daemons export the same 1 GiB raw image (a `file` node, plus `raw`) as a FUSE mount over an
empty regular file; "direct" is fio on the image file itself, the ceiling.

Where the image lives (--place). Issue 6 has two targets that no single location can test:
"2x qemu-storage-daemon on 4k random at QD16" compares what the exports cost per request, and on
a disk the disk's own ceiling hides it (there, direct 4k writes at QD16 ran at 21.9k IOPS against
13.7k through qemu-storage-daemon, so 2x is above what the disk does); "80% of direct on 1M
sequential" compares with the disk, while on memory "direct" is one copy at memory speed and any
FUSE server adds at least one more copy of every byte, so 50% is the most it could reach. The
default, `split`, therefore runs the 4k workloads on an image in memory (--memory-image,
/dev/shm) and the 1M workloads on one on disk (--image, /var/tmp); `disk` runs everything on
--image (the layout before this option, as in the 05:44 UTC results) and `memory` everything on
--memory-image. For every repetition,
workload and target in turn (interleaved, so background load hits all alike), the script starts
the daemon alone, waits until the mount appears, runs fio on the mounted file, reads the daemon's
CPU time before and after, and stops it with SIGTERM (checking that the mount went away). fio
runs with direct=1 everywhere, with the io_uring and psync engines. Results (medians, ratios and
issue 6's targets) are appended to the output file. Standard library only; it reuses run.py's
helpers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as common  # noqa: E402  (bench/run.py: machine info, CPU time, formatting)

REPO = common.REPO
IMAGE_SIZE = common.IMAGE_SIZE
TARGETS = ("blockd", "qsd", "direct")


@dataclasses.dataclass(frozen=True)
class Workload:
    key: str
    label: str
    engine: str
    fio_args: tuple[str, ...]


def make_workloads() -> list[Workload]:
    workloads = []
    for engine in ("io_uring", "psync"):
        # psync is synchronous: its queue depth comes from parallel jobs.
        def depth(qd: int) -> tuple[str, ...]:
            if engine == "psync":
                return ("--iodepth=1", f"--numjobs={qd}") if qd > 1 else ("--iodepth=1",)
            return (f"--iodepth={qd}",)

        seq_depth = 8 if engine == "io_uring" else 1
        workloads += [
            Workload(f"{engine}-randread-4k-qd1", f"4k randread QD1 ({engine})", engine,
                     ("--rw=randread", "--bs=4k", *depth(1))),
            Workload(f"{engine}-randread-4k-qd16", f"4k randread QD16 ({engine})", engine,
                     ("--rw=randread", "--bs=4k", *depth(16))),
            Workload(f"{engine}-randwrite-4k-qd16", f"4k randwrite QD16 ({engine})", engine,
                     ("--rw=randwrite", "--bs=4k", *depth(16))),
            Workload(f"{engine}-read-1m", f"1M seq read QD{seq_depth} ({engine})", engine,
                     ("--rw=read", "--bs=1M", *depth(seq_depth))),
            Workload(f"{engine}-write-1m", f"1M seq write QD{seq_depth} ({engine})", engine,
                     ("--rw=write", "--bs=1M", *depth(seq_depth))),
        ]
    return workloads


def daemon_argv(program: list[str], image: str, mountpoint: str, cache_direct: bool) -> list[str]:
    cache = "on" if cache_direct else "off"
    return [
        *program,
        "--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct={cache}",
        "--blockdev", "driver=raw,node-name=disk,file=file0",
        "--export", f"type=fuse,id=export0,node-name=disk,mountpoint={mountpoint},writable=on",
    ]


def fuse_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            separator = fields.index("-")
            if fields[separator + 1].startswith("fuse") and fields[4] == path:
                return True
    return False


def wait_mounted(proc: subprocess.Popen, path: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"daemon exited with status {proc.returncode} before mounting"
        if fuse_mounted(path) and os.stat(path).st_size == IMAGE_SIZE:
            return ""
        time.sleep(0.05)
    return f"not mounted after {timeout:.0f} s"


@dataclasses.dataclass
class Run:
    target: str
    workload: str
    rep: int
    iops: float = float("nan")
    bandwidth: float = float("nan")  # bytes/s
    cpu_per_io_us: float = float("nan")
    error: str = ""


def image_for(workload: Workload, args) -> str:
    """The image a workload runs on, after --place (see the module's documentation)."""
    if args.place == "disk" or (args.place == "split" and "1m" in workload.key):
        return args.image
    return args.memory_image


def images_in_use(workloads: list[Workload], args) -> list[str]:
    return list(dict.fromkeys(image_for(w, args) for w in workloads))


def run_one(target: str, workload: Workload, rep: int, args, workdir: Path) -> Run:
    result = Run(target, workload.key, rep)
    mountpoint = workdir / "mnt"
    mountpoint.touch()
    proc = None
    log = workdir / f"{target}.log"
    image = image_for(workload, args)
    filename = image
    if target != "direct":
        program = args.blockd if target == "blockd" else ["qemu-storage-daemon"]
        argv = daemon_argv(program, image, str(mountpoint), args.cache_direct)
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        problem = wait_mounted(proc, str(mountpoint))
        if problem:
            result.error = problem + ": " + common.tail(log)
            common.stop(proc)
            return result
        filename = str(mountpoint)
    fio = [args.fio, "--name=bench", f"--filename={filename}", f"--ioengine={workload.engine}",
           "--direct=1", f"--size={IMAGE_SIZE}", "--time_based", f"--runtime={args.runtime}",
           "--norandommap", "--randrepeat=0", "--group_reporting", "--output-format=json",
           *workload.fio_args]
    before = common.cpu_seconds(proc.pid) if proc else 0.0
    try:
        out = subprocess.run(fio, capture_output=True, text=True, timeout=args.runtime + 60)
    except subprocess.TimeoutExpired:
        result.error = "fio hung"
        out = None
    after = common.cpu_seconds(proc.pid) if proc and proc.poll() is None else before
    if out is not None:
        if out.returncode != 0:
            result.error = f"fio failed ({out.returncode}): {out.stderr.strip()[-800:]}"
        else:
            job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
            ios = 0
            for direction in ("read", "write"):
                result.iops = (0 if result.iops != result.iops else result.iops) + job[direction]["iops"]
                result.bandwidth = ((0 if result.bandwidth != result.bandwidth else result.bandwidth)
                                    + job[direction]["bw_bytes"])
                ios += job[direction]["total_ios"]
            if proc and ios:
                result.cpu_per_io_us = (after - before) / ios * 1e6
    if proc:
        note = common.stop(proc)
        if note:
            result.error = (result.error + "; " if result.error else "") + note
        if fuse_mounted(str(mountpoint)):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
            result.error = (result.error + "; " if result.error else "") + "mount left behind after SIGTERM"
    return result


def report(runs: list[Run], workloads: list[Workload], args, started: str) -> str:
    by: dict[tuple[str, str], list[Run]] = {}
    for entry in runs:
        by.setdefault((entry.target, entry.workload), []).append(entry)

    def med(target: str, key: str, field: str) -> float:
        values = [getattr(r, field) for r in by.get((target, key), []) if not r.error]
        return common.median(values)

    lines = [
        "",
        f"## FUSE export: blockd vs qemu-storage-daemon vs direct file access ({started})",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
        "",
        f"Images (--place {args.place}): 1 GiB raw, "
        + "; ".join(f"`{path}` for {', '.join(w.key for w in workloads if image_for(w, args) == path)}"
                    for path in images_in_use(workloads, args))
        + f"; node `file` (cache.direct={'on' if args.cache_direct else 'off'})"
        " + `raw`; fio `--direct=1 --time_based "
        f"--runtime={args.runtime} --norandommap`, {args.reps} interleaved repetitions; medians. "
        + ("CPUs kept awake by idle-priority busy loops (`--awake 1`; see bench/run.py "
           "keep_awake)." if args.awake else "CPUs left to halt when idle (`--awake 0`)."),
        "",
    ]
    lines += [f"- {name}: {value}" for name, value in common.machine(args.fio)
              if name not in ("qemu-nbd", "nbdkit", "blockd-daemon", "blockd build")]
    lines += [f"- blockd-daemon: `{' '.join(args.blockd)}` (this tree, "
              f"{common.first_line(['git', '-C', str(REPO), 'rev-parse', '--short', 'HEAD'])})", ""]
    lines += [
        "| workload | blockd | qsd | direct | blockd / qsd | blockd / direct | "
        "CPU µs/IO blockd | CPU µs/IO qsd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for workload in workloads:
        seq = "1m" in workload.key
        field = "bandwidth" if seq else "iops"
        fmt = common.fmt_bw if seq else (lambda v: common.fmt_count(v) + " IOPS")
        values = {t: med(t, workload.key, field) for t in TARGETS}
        cells = [fmt(values[t]) if values[t] == values[t] else "–" for t in TARGETS]
        ratio_qsd = values["blockd"] / values["qsd"] if values["qsd"] else float("nan")
        ratio_direct = values["blockd"] / values["direct"] if values["direct"] else float("nan")
        cpu = [med(t, workload.key, "cpu_per_io_us") for t in ("blockd", "qsd")]
        lines.append(f"| {workload.label} | {' | '.join(cells)} | {ratio_qsd:.2f}× | "
                     f"{ratio_direct * 100:.0f}% | {cpu[0]:.1f} | {cpu[1]:.1f} |")
    lines += ["", "Per repetition (IOPS for 4k, MiB/s for 1M):", ""]
    for workload in workloads:
        seq = "1m" in workload.key
        parts = []
        for target in TARGETS:
            values = [(r.bandwidth / (1 << 20) if seq else r.iops) for r in by.get((target, workload.key), [])
                      if not r.error]
            parts.append(f"{target} " + "/".join(f"{v:.0f}" for v in values))
        lines.append(f"- {workload.key}: " + "; ".join(parts))
    lines += ["", "Issue 6 targets:", ""]
    ran = {w.key for w in workloads}
    for engine in ("io_uring", "psync"):
        for key in (f"{engine}-randread-4k-qd16", f"{engine}-randwrite-4k-qd16"):
            if key not in ran:
                continue
            b, q = med("blockd", key, "iops"), med("qsd", key, "iops")
            ratio = b / q if q else float("nan")
            lines.append(f"- {key}: blockd/qsd = {ratio:.2f}× (target ≥ 2×): "
                         f"{'met' if ratio >= 2 else 'NOT met'}")
        for key in (f"{engine}-read-1m", f"{engine}-write-1m"):
            if key not in ran:
                continue
            b, d = med("blockd", key, "bandwidth"), med("direct", key, "bandwidth")
            ratio = b / d if d else float("nan")
            lines.append(f"- {key}: blockd/direct = {ratio * 100:.0f}% (target ≥ 80%): "
                         f"{'met' if ratio >= 0.8 else 'NOT met'}")
    failed = [r for r in runs if r.error]
    lines += ["", f"Failed runs: {len(failed)} of {len(runs)}"]
    lines += [f"- {r.target} {r.workload} rep {r.rep}: {r.error}" for r in failed]
    if args.notes:
        lines += ["", Path(args.notes).read_text().strip()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s per run instead of 10 s")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=None)
    parser.add_argument("--image", default="/var/tmp/blockd-fuse-bench.img",
                        help="the image on disk (default in /var/tmp)")
    parser.add_argument("--memory-image", default="/dev/shm/blockd-fuse-bench.img",
                        help="the image in memory (default in /dev/shm)")
    parser.add_argument("--place", choices=("split", "disk", "memory"), default="split",
                        help="split (default): 4k workloads on --memory-image, 1M on --image; "
                             "disk: all on --image (the layout before); memory: all on --memory-image")
    parser.add_argument("--cache-direct", action=argparse.BooleanOptionalAction, default=True,
                        help="open the image with O_DIRECT in the daemons (default on)")
    parser.add_argument("--blockd", default=None,
                        help="blockd-daemon command line (default: the venv's blockd-daemon)")
    parser.add_argument("--workloads", default="", help="comma-separated workload keys")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--output", default=str(REPO / "bench/RESULTS.md"))
    parser.add_argument("--notes", default="", help="Markdown file appended to the report")
    parser.add_argument("--fio", default=shutil.which("fio") or "fio")
    parser.add_argument("--awake", type=int, choices=(0, 1), default=0,
                        help="1: keep every CPU from halting with idle-priority busy loops "
                             "(bench/run.py keep_awake); 0 (default): let them halt")
    parser.add_argument("--keep-image", action="store_true",
                        help="keep the image for the next run (default: remove it at the end)")
    args = parser.parse_args()
    args.runtime = args.runtime or (3 if args.quick else 10)
    args.blockd = shlex.split(args.blockd) if args.blockd else [common.blockd_daemon()]
    workloads = make_workloads()
    if args.workloads:
        wanted = set(args.workloads.split(","))
        workloads = [w for w in workloads if w.key in wanted]
    targets = [t for t in args.targets.split(",") if t in TARGETS]
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    for image in images_in_use(workloads, args):
        if not os.path.exists(image) or os.stat(image).st_size != IMAGE_SIZE:
            common.make_image(Path(image))
    runs: list[Run] = []
    with (tempfile.TemporaryDirectory(prefix="blockd-fuse-bench-") as tmp,
          common.keep_awake(bool(args.awake))):
        for rep in range(args.reps):
            for workload in workloads:
                for target in targets:
                    entry = run_one(target, workload, rep, args, Path(tmp))
                    runs.append(entry)
                    value = (f"{entry.bandwidth / (1 << 20):.0f} MiB/s" if "1m" in workload.key
                             else f"{entry.iops:.0f} IOPS")
                    print(f"rep {rep} {workload.key:28} {target:7} {entry.error or value}", flush=True)
    if not args.keep_image:
        for image in images_in_use(workloads, args):
            os.unlink(image)
    text = report(runs, workloads, args, started)
    with open(args.output, "a") as out:
        out.write(text)
    print(text)
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
