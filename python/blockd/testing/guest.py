"""Booting a small Linux guest under QEMU whose only disk is a vhost-user-blk device.

Tests of a vhost-user-blk export need the real client: QEMU's vhost-user-blk-pci device with a
guest kernel's virtio_blk driver on top. ``run_guest(socket, script)`` boots such a guest (TCG,
a few seconds) with the export's socket as its disk ``/dev/vda``, runs ``script`` with busybox's
``sh`` in the guest, and returns what the script printed and its exit status.

What the guest is made of, and where it comes from:

* the kernel (``vmlinuz``) and the virtio modules it does not build in come from Debian's kernel
  image package, the one behind ``linux-image-cloud-amd64``; ``apt-get download`` fetches it and
  ``dpkg-deb -x`` unpacks it, nothing is installed on the host;
* ``/bin/busybox`` comes from Debian's ``busybox-static``, fetched the same way;
* ``blkdiscard`` (for ``-z``, write zeroes, which busybox lacks) is the host's util-linux binary,
  copied into /usr/local/sbin with the shared libraries ``ldd`` names. Call it by that full path:
  busybox's shell runs its own applet of the same name otherwise.

Both packages are unpacked once into a cache (``$BLOCKD_GUEST_CACHE``, default
``/var/cache/blockd-guest``, or ``~/.cache/blockd-guest`` when that is not writable) under a file
lock, so parallel tests neither race nor download twice. When something cannot be fetched,
``GuestUnavailable`` says exactly what; ``guest_or_skip()`` turns it into a pytest skip.

The initramfs (cpio "newc", gzip) is written by this module itself: an ``/init`` that mounts
/proc, /sys and /dev, loads the modules, waits for ``/dev/vda``, runs the script between the
markers ``BEGIN_MARKER`` and ``END_MARKER`` on the serial console, then the kernel log, and
powers the guest off.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import io
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from .process import tool_env

__all__ = [
    "GuestFailed",
    "GuestImage",
    "GuestResult",
    "GuestUnavailable",
    "guest_image",
    "guest_or_skip",
    "run_guest",
]

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
QEMU = "qemu-system-x86_64"
# The modules /dev/vda needs that Debian's cloud kernel builds as modules; their own dependencies
# are read from each module's modinfo and loaded first.
GUEST_MODULES = ("virtio_pci", "virtio_blk")
# Host programs copied into the guest with their libraries (util-linux is essential on Debian).
HOST_PROGRAMS = ("/usr/sbin/blkdiscard",)

BEGIN_MARKER = "=====BLOCKD-GUEST-SCRIPT-BEGIN====="
END_MARKER = "=====BLOCKD-GUEST-SCRIPT-END====="
KERNEL_LOG_MARKER = "=====BLOCKD-GUEST-KERNEL-LOG====="
_CACHE_LAYOUT = "1"  # bump when the cache's layout changes


class GuestUnavailable(Exception):
    """The guest kernel, busybox or QEMU is missing and cannot be fetched; the message says which."""


class GuestFailed(AssertionError):
    """The guest did not run the script to its end (QEMU failed, the guest hung or crashed)."""


@dataclasses.dataclass
class GuestResult:
    """What a guest's script printed (stdout and stderr, in order) and its exit status.

    ``console`` is the whole serial console (kernel messages included), ``qemu_stderr`` what QEMU
    itself printed; both are for diagnosing failures.
    """

    output: str
    status: int
    console: str
    qemu_stderr: str

    @property
    def kernel_log(self) -> str:
        """The guest kernel's log (dmesg) after the script, for its driver's errors."""
        text = self.console.replace("\r\n", "\n")
        start = text.find(KERNEL_LOG_MARKER + "\n")
        return text[start + len(KERNEL_LOG_MARKER) + 1:] if start >= 0 else ""

    def values(self) -> dict[str, str]:
        """The ``name=value`` lines of the output as a dict (later lines win)."""
        found = {}
        for line in self.output.splitlines():
            match = re.fullmatch(r"([A-Za-z_][\w.-]*)=(.*)", line.strip())
            if match:
                found[match.group(1)] = match.group(2)
        return found

    def __str__(self) -> str:
        log = "\n".join(self.kernel_log.splitlines()[-30:])
        return (f"guest script exited with {self.status}; output:\n{self.output}\n"
                f"guest kernel log (end):\n{log}")


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """An unpacked guest: the kernel, its modules in load order, and busybox."""

    kernel: Path
    modules: tuple[Path, ...]
    busybox: Path
    kernel_release: str


# ---- Fetching and caching.


def _cache_root() -> Path:
    configured = os.environ.get("BLOCKD_GUEST_CACHE")
    if configured:
        return Path(configured)
    system = Path("/var/cache/blockd-guest")
    try:
        system.mkdir(parents=True, exist_ok=True)
        if os.access(system, os.W_OK):
            return system
    except OSError:
        pass
    return Path.home() / ".cache" / "blockd-guest"


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run_tool(argv: list[str], what: str, cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise GuestUnavailable(f"cannot fetch {what}: {argv[0]} is not installed")
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, env=tool_env())
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        hint = " (are the apt package lists there? apt-get update)" if argv[0].startswith("apt") else ""
        raise GuestUnavailable(
            f"cannot fetch {what}: `{' '.join(argv)}` failed with {result.returncode}"
            + (f": {detail[-1]}" if detail else "") + hint
        )
    return result.stdout


def _kernel_package() -> str:
    """The versioned package behind the kernel metapackage (linux-image-6.1.0-N-cloud-amd64)."""
    out = _run_tool(["apt-cache", "depends", KERNEL_METAPACKAGE], f"the guest kernel ({KERNEL_METAPACKAGE})")
    for line in out.splitlines():
        match = re.fullmatch(r"\s*Depends:\s*(linux-image-\S+)", line)
        if match:
            return match.group(1)
    raise GuestUnavailable(f"cannot fetch the guest kernel: `apt-cache depends {KERNEL_METAPACKAGE}` names no "
                           "linux-image package")


def _download_and_unpack(package: str, into: Path, scratch: Path) -> None:
    """apt-get download `package` into `scratch` and unpack it under `into`."""
    # apt drops privileges to _apt for downloads; a directory it may write avoids its warning.
    scratch.mkdir(parents=True, exist_ok=True)
    os.chmod(scratch, 0o777)
    _run_tool(["apt-get", "download", "-q", package], f"Debian package {package}", cwd=scratch)
    debs = sorted(scratch.glob(f"{package}_*.deb"))
    if not debs:
        raise GuestUnavailable(f"cannot fetch Debian package {package}: apt-get download left no .deb")
    _run_tool(["dpkg-deb", "-x", str(debs[-1]), str(into)], f"Debian package {package} (unpacking)")


def _module_depends(module: Path) -> list[str]:
    """The module names in `module`'s modinfo ``depends=`` field."""
    match = re.search(rb"\0depends=([^\0]*)\0", b"\0" + module.read_bytes())
    if match is None:
        return []
    return [name for name in match.group(1).decode().split(",") if name]


def _modules_in_load_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[Path]:
    by_name = {path.name.removesuffix(".ko"): path for path in modules_dir.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in by_name:
            raise GuestUnavailable(f"the guest kernel has no module {name}.ko (nor is it built in)")
        for dependency in _module_depends(by_name[name]):
            visit(dependency)
        order.append(by_name[name])

    for name in wanted:
        visit(name)
    return order


def _built_in(config: Path, option: str) -> bool:
    return f"\n{option}=y\n" in "\n" + config.read_text() + "\n"


def _populate(cache: Path) -> None:
    """Fetches the kernel and busybox packages and keeps only what the guest needs in `cache`."""
    package = _kernel_package()
    with tempfile.TemporaryDirectory(dir=cache, prefix="fetch-") as scratch_name:
        scratch = Path(scratch_name)
        _download_and_unpack(package, scratch / "kernel", scratch / "debs")
        _download_and_unpack(BUSYBOX_PACKAGE, scratch / "busybox", scratch / "debs")
        kernels = sorted((scratch / "kernel" / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise GuestUnavailable(f"Debian package {package} holds no /boot/vmlinuz-*")
        release = kernels[-1].name.removeprefix("vmlinuz-")
        config = scratch / "kernel" / "boot" / f"config-{release}"
        modules_dir = scratch / "kernel" / "lib" / "modules" / release
        wanted = tuple(name for name in GUEST_MODULES
                       if not (config.exists() and _built_in(config, f"CONFIG_{name.upper()}")))
        modules = _modules_in_load_order(modules_dir, wanted)
        busybox = scratch / "busybox" / "bin" / "busybox"
        if not busybox.exists():
            raise GuestUnavailable(f"Debian package {BUSYBOX_PACKAGE} holds no /bin/busybox")

        staged = scratch / "staged"
        (staged / "modules").mkdir(parents=True)
        shutil.copy2(kernels[-1], staged / "vmlinuz")
        shutil.copy2(busybox, staged / "busybox")
        for index, module in enumerate(modules):
            # The number keeps the load order in the file names.
            shutil.copy2(module, staged / "modules" / f"{index:02d}-{module.name}")
        (staged / "release").write_text(f"{release}\n{package}\n")
        target = cache / "guest"
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)


_image: GuestImage | None = None


def guest_image() -> GuestImage:
    """The cached guest kernel, modules and busybox, fetched on first use.

    Raises GuestUnavailable naming what could not be fetched.
    """
    global _image
    if _image is not None:
        return _image
    root = _cache_root() / f"v{_CACHE_LAYOUT}"
    try:
        with _locked(root):
            guest = root / "guest"
            if not (guest / "release").exists():
                _populate(root)
    except OSError as error:
        raise GuestUnavailable(f"cannot set up the guest cache in {root}: {error}") from error
    release = (guest / "release").read_text().split()[0]
    _image = GuestImage(
        kernel=guest / "vmlinuz",
        modules=tuple(sorted((guest / "modules").glob("*.ko"))),
        busybox=guest / "busybox",
        kernel_release=release,
    )
    return _image


def guest_or_skip() -> GuestImage:
    """``guest_image()``, or a pytest skip with the reason when the guest cannot be had."""
    import pytest

    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed (Debian package qemu-system-x86)")
    try:
        return guest_image()
    except GuestUnavailable as error:
        pytest.skip(str(error))


# ---- The initramfs.


class _Cpio:
    """A cpio archive in the "newc" format, as the kernel unpacks an initramfs."""

    def __init__(self) -> None:
        self.data = io.BytesIO()
        self.inode = 1000
        self.directories: set[str] = set()

    def _entry(self, name: str, mode: int, body: bytes = b"") -> None:
        self.inode += 1
        fields = [self.inode, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08X" % field for field in fields)
        self.data.write(header + name.encode() + b"\0")
        self.data.write(b"\0" * (-self.data.tell() % 4))
        self.data.write(body)
        self.data.write(b"\0" * (-self.data.tell() % 4))

    def directory(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for depth in range(1, len(parts) + 1):
            path = "/".join(parts[:depth])
            if path and path not in self.directories:
                self.directories.add(path)
                self._entry(path, 0o040755)

    def file(self, name: str, body: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        if "/" in name:
            self.directory(name.rsplit("/", 1)[0])
        self._entry(name, 0o100000 | mode, body)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.data.getvalue()


def _host_program_files(program: str) -> dict[str, Path]:
    """`program` and the shared libraries it loads (from ldd), by their path in the guest."""
    files = {"usr/local/sbin/" + os.path.basename(program): Path(program)}
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True, env=tool_env()).stdout
    for line in out.splitlines():
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            path = match.group(1)
            files[path] = Path(path)
    return files


_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin /tmp
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in /lib/guest-modules/*.ko; do
    insmod "$module" || echo "init: insmod $module failed"
done
for disk in {disks}; do
    waited=0
    while [ ! -b /dev/$disk ] && [ $waited -lt 100 ]; do sleep 0.1; waited=$((waited + 1)); done
    [ -b /dev/$disk ] || echo "init: /dev/$disk did not appear"
done
dmesg -n 1
echo {begin}
sh /test.sh 2>&1
echo "{end} status=$?"
echo {log}
dmesg
poweroff -f
"""


def build_initramfs(image: GuestImage, script: str, files: Mapping[str, bytes] = {}, disks: int = 1) -> bytes:
    """The gzipped initramfs that runs `script` once `disks` disks are there, with `files`
    (guest path -> content) added."""
    archive = _Cpio()
    archive.directory("dev")
    names = " ".join("vd" + chr(ord("a") + index) for index in range(disks))
    init = _INIT.format(begin=BEGIN_MARKER, end=END_MARKER, log=KERNEL_LOG_MARKER, disks=names)
    archive.file("init", init.encode(), 0o755)
    archive.file("bin/busybox", image.busybox.read_bytes(), 0o755)
    for module in image.modules:
        archive.file(f"lib/guest-modules/{module.name}", module.read_bytes())
    for program in HOST_PROGRAMS:
        if os.path.exists(program):
            for guest_path, host_path in _host_program_files(program).items():
                archive.file(guest_path, host_path.read_bytes(), 0o755)
    archive.file("test.sh", script.encode(), 0o755)
    for guest_path, content in files.items():
        archive.file(guest_path, content)
    return gzip.compress(archive.finish(), compresslevel=1)


# ---- Running the guest.


def _between_markers(console: str) -> tuple[str, int] | None:
    text = console.replace("\r\n", "\n")
    begin = text.find(BEGIN_MARKER + "\n")
    if begin < 0:
        return None
    match = re.compile(re.escape(END_MARKER) + r" status=(\d+)").search(text, begin)
    if match is None:
        return None
    return text[begin + len(BEGIN_MARKER) + 1:match.start()], int(match.group(1))


Socket = str | os.PathLike[str]


def run_guest(
    vhost_socket: Socket | Sequence[Socket],
    script: str,
    *,
    num_queues: int | Sequence[int] = 1,
    files: Mapping[str, bytes] = {},
    timeout: float = 120.0,
    memory_mib: int = 256,
) -> GuestResult:
    """Boots a guest whose /dev/vda is the vhost-user-blk export at `vhost_socket` and runs
    `script` (busybox sh, as root) in it.

    Given several sockets, the guest gets one disk each, in order: /dev/vda, /dev/vdb, ...
    `num_queues` is each device's number of virtqueues (one number for all, or one each); the
    guest gets as many CPUs as the largest, since its driver uses no more queues than CPUs.
    `files` are added to the guest's root file system. Returns the script's output and exit
    status; raises GuestFailed when QEMU fails or the script does not finish within `timeout`
    seconds (QEMU is killed then), GuestUnavailable when the guest cannot be fetched.
    """
    image = guest_image()
    if shutil.which(QEMU) is None:
        raise GuestUnavailable(f"{QEMU} is not installed (Debian package qemu-system-x86)")
    sockets = [vhost_socket] if isinstance(vhost_socket, (str, os.PathLike)) else list(vhost_socket)
    queues = [num_queues] * len(sockets) if isinstance(num_queues, int) else list(num_queues)
    if len(queues) != len(sockets):
        raise ValueError(f"{len(sockets)} sockets but {len(queues)} queue counts")
    devices = []
    for index, (path, count) in enumerate(zip(sockets, queues)):
        # Fixed PCI slots in socket order: the guest names the disks in probe (slot) order.
        devices += ["-chardev", f"socket,id=vhost{index},path={os.fspath(path)}",
                    "-device", f"vhost-user-blk-pci,chardev=vhost{index},num-queues={count},addr={4 + index:#x}"]
    with tempfile.TemporaryDirectory(prefix="blockd-guest-") as scratch:
        initrd = Path(scratch) / "initrd.gz"
        initrd.write_bytes(build_initramfs(image, script, files, len(sockets)))
        argv = [
            QEMU, "-accel", "tcg", "-cpu", "qemu64,-cx16", "-smp", str(max(queues)),
            "-m", f"{memory_mib}M",
            # vhost-user: the back-end maps guest RAM, so it must be shared memory.
            "-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
            "-numa", "node,memdev=mem",
            "-nodefaults", "-nographic", "-no-reboot", "-serial", "stdio",
            "-kernel", str(image.kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet",
            *devices,
        ]
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=tool_env())
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            console = stdout.decode(errors="replace")
            raise GuestFailed(f"the guest did not finish within {timeout} s; console:\n{console}\n"
                              f"QEMU: {stderr.decode(errors='replace')}") from None
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    console = stdout.decode(errors="replace")
    qemu_stderr = stderr.decode(errors="replace")
    found = _between_markers(console)
    if found is None:
        raise GuestFailed(f"the guest script did not run to its end (QEMU exited with {process.returncode}); "
                          f"console:\n{console}\nQEMU: {qemu_stderr}")
    output, status = found
    return GuestResult(output=output, status=status, console=console, qemu_stderr=qemu_stderr)
