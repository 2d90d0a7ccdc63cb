#!/usr/bin/env python3
"""Compare a 3-way quorum exported over NBD by blockd-daemon and by qemu-storage-daemon, with fio.

Usage (from the repository root, after `./dev build`):

    .venv/bin/python bench/quorum.py [--runtime S] [--reps N] [--size MiB] [--blockd PATH]
        [--servers blockd,qsd,blockd-single] [--workloads randread-4k-qd32,...]

Three identical raw files in /dev/shm are the children of a quorum node (vote-threshold 2), which
each server exports over a unix socket; a single raw node over one of the files, exported by
blockd, is the reference for the issue's "reads within 20% of a single child" target. Servers and
workloads run interleaved, one at a time, through bench/run.py's run_one (fio's nbd engine, server
CPU from /proc). Prints a Markdown table of median IOPS, bandwidth and server CPU time per I/O,
with the load average. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: fio runner, server life cycle)

WORKLOADS = [
    bench.Workload("randread-4k-qd32", "4k randread QD32", ("--rw=randread", "--bs=4k", "--iodepth=32")),
    bench.Workload("randwrite-4k-qd32", "4k randwrite QD32", ("--rw=randwrite", "--bs=4k", "--iodepth=32")),
    bench.Workload("read-1m-qd8", "1M seq read QD8", ("--rw=read", "--bs=1M", "--iodepth=8")),
    bench.Workload("write-1m-qd8", "1M seq write QD8", ("--rw=write", "--bs=1M", "--iodepth=8")),
]


def quorum_argv(program: str, image: str, sock: str) -> list[str]:
    children = [f"{image}.c{i}" for i in range(3)]
    argv = [program]
    for index, path in enumerate(children):
        argv += ["--blockdev", f"driver=file,node-name=f{index},filename={path}"]
    argv += [
        "--blockdev", "driver=quorum,node-name=disk,vote-threshold=2,"
        "children.0=f0,children.1=f1,children.2=f2",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=export0,node-name=disk,writable=on",
    ]
    return argv


def single_argv(program: str, image: str, sock: str) -> list[str]:
    return bench.qsd_style_argv(program, f"{image}.c0", sock)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio run (default 5)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="seconds of unmeasured fio before each measured run, on the same "
                             "server process (default 1; 0: none)")
    bench.add_condition_arguments(parser)
    parser.add_argument("--size", type=int, default=512, help="child size in MiB (default 512)")
    parser.add_argument("--image", default="/dev/shm/blockd-quorum-bench",
                        help="children are IMAGE.c0, .c1, .c2 (default in /dev/shm; removed)")
    parser.add_argument("--blockd", help="the blockd-daemon to run (default: the venv's)")
    parser.add_argument("--servers", help="comma-separated subset of blockd,qsd,blockd-single")
    parser.add_argument("--workloads", help="comma-separated subset of "
                        + ",".join(w.key for w in WORKLOADS))
    args = parser.parse_args()
    fio = shutil.which("fio")
    if not fio:
        sys.exit("bench: fio not found (Debian package fio)")
    blockd = args.blockd or bench.blockd_daemon()
    servers = [
        bench.Server("blockd", "blockd-daemon quorum", lambda i, s: quorum_argv(blockd, i, s), ""),
        bench.Server("qsd", "qemu-storage-daemon quorum",
                     lambda i, s: quorum_argv("qemu-storage-daemon", i, s), ""),
        bench.Server("blockd-single", "blockd-daemon single raw child",
                     lambda i, s: single_argv(blockd, i, s), ""),
    ]
    if args.servers:
        servers = [s for s in servers if s.key in args.servers.split(",")]
    workloads = WORKLOADS
    if args.workloads:
        workloads = [w for w in WORKLOADS if w.key in args.workloads.split(",")]
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    chunk = bytes(range(256)) * 4096
    paths = [Path(f"{args.image}.c{i}") for i in range(3)]
    for path in paths:
        with open(path, "wb") as f:
            for index in range(args.size):
                f.write(index.to_bytes(8, "little") + chunk[8:])
    results: dict[tuple[str, str], list[bench.Run]] = {}
    try:
        with (tempfile.TemporaryDirectory(prefix="blockd-quorum-bench-") as tmp,
                  bench.keep_awake(bool(args.awake))):
            for rep in range(1, args.reps + 1):
                for workload in workloads:
                    for server in servers:
                        run = bench.run_steady(
                            lambda: bench.run_one(server, workload, rep, args.image, Path(tmp),
                                                  args.runtime, fio, warmup=args.warmup),
                            args.max_steal, args.max_other, args.retries)
                        results.setdefault((workload.key, server.key), []).append(run)
                        print(f"rep {rep} {workload.key} {server.key}: "
                              + (f"{run.iops:.0f} IOPS, {run.cpu_us_per_io:.1f} µs CPU/IO, "
                                 f"{run.steal_percent:.0f}% steal, {run.other_percent:.0f}% other, "
                                 f"attempt {run.attempts}"
                                 if run.ok else f"FAILED {run.error[:300]}"),
                              flush=True)
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print()
    kept = [r for runs in results.values() for r in runs if r.ok]
    noisy = sum(bench.disturbed(r, args.max_steal, args.max_other) for r in kept)
    print(f"load average at start {load_start}, at end {load_end}; warm-up {args.warmup} s; "
          f"{noisy} of {len(kept)} kept runs had more than {args.max_steal:g}% steal or "
          f"{args.max_other:g}% other CPU after up to {args.retries} repeats; cells: median IOPS, "
          "MiB/s, server CPU µs per I/O, steal %, other %")
    print()
    keys = [s.key for s in servers]
    print("| workload | " + " | ".join(s.label for s in servers) + " | blockd / qsd | quorum / single |")
    print("|---" * (len(servers) + 3) + "|")
    for workload in workloads:
        medians = {}
        cells = []
        for server in servers:
            runs = [r for r in results.get((workload.key, server.key), []) if r.ok]
            iops = statistics.median(r.iops for r in runs) if runs else 0.0
            bw = statistics.median(r.bw_bytes for r in runs) if runs else 0.0
            cpu = statistics.median(r.cpu_us_per_io for r in runs) if runs else float("nan")
            steal = statistics.median(r.steal_percent for r in runs) if runs else float("nan")
            other = statistics.median(r.other_percent for r in runs) if runs else float("nan")
            medians[server.key] = iops
            cells.append(f"{iops:,.0f} IOPS, {bw / 2**20:,.0f} MiB/s, {cpu:.1f} µs, "
                         f"{steal:.0f}% steal, {other:.0f}% other")
        ratio = (medians["blockd"] / medians["qsd"]
                 if "blockd" in keys and "qsd" in keys and medians["qsd"] else float("nan"))
        single = (medians["blockd"] / medians["blockd-single"]
                  if "blockd" in keys and "blockd-single" in keys and medians["blockd-single"]
                  else float("nan"))
        print(f"| {workload.label} | " + " | ".join(cells) + f" | {ratio:.2f} | {single:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
