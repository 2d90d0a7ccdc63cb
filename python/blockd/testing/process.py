"""Running a storage daemon (blockd-daemon or qemu-storage-daemon) under a test.

``DaemonProcess`` starts the daemon with a QMP monitor on a unix socket it adds to the command
line, connects a ``QMPClient`` once the daemon is ready, and stops it (QMP ``quit``, then SIGTERM,
then SIGKILL as a last resort) at ``stop()``, returning the exit status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ..qmp.client import QMPClient

__all__ = ["DaemonProcess", "DaemonFailed", "blockd_command", "blockd_env", "tool_env", "QSD"]

QSD = "/usr/bin/qemu-storage-daemon"


def tool_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a program that is not blockd (qemu-img, qemu-storage-daemon, ...).

    Under ``./dev asan`` the ASan runtime is preloaded into every Python process
    (``LD_PRELOAD``, with ``BLOCKD_ASAN_PRELOAD`` naming it); other programs must not inherit it.
    """
    env = dict(os.environ if base is None else base)
    preload = env.get("BLOCKD_ASAN_PRELOAD")
    if preload and env.get("LD_PRELOAD", "").strip() == preload:
        del env["LD_PRELOAD"]
    return env


def blockd_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a blockd Python process (the daemon, a kernel importing blockd).

    Under ``./dev asan`` the plugin takes ``LD_PRELOAD`` out of the test process's environment so
    that tools started by tests do not inherit the ASan runtime; blockd's own processes get it
    back here, since its extension module is instrumented.
    """
    env = dict(os.environ if base is None else base)
    preload = env.get("BLOCKD_ASAN_PRELOAD")
    if preload:
        env["LD_PRELOAD"] = preload
    return env


def blockd_command() -> list[str]:
    """The command that runs blockd-daemon with this interpreter."""
    return [sys.executable, "-m", "blockd"]


class DaemonFailed(AssertionError):
    """The daemon exited while the test expected it to run, or exited with a failure."""


class DaemonProcess:
    """A daemon process with a QMP client.

    Args:
        args: the daemon's options (``--blockdev ...`` etc.).
        command: the program, default blockd-daemon (``blockd_command()``); pass ``[QSD]`` for
            the reference qemu-storage-daemon.
        directory: where the QMP socket goes (default: a new temporary directory).
        monitor: add ``--chardev socket,...`` and ``--monitor`` for QMP (default True).
        start_timeout: seconds to wait for the daemon to answer.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        command: Sequence[str] | None = None,
        directory: str | os.PathLike[str] | None = None,
        monitor: bool = True,
        start_timeout: float = 30.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = list(command) if command is not None else blockd_command()
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._own_dir = tempfile.TemporaryDirectory(prefix="blockd-test-")
            directory = self._own_dir.name
        self.directory = Path(directory)
        self.qmp_path = self.directory / f"qmp-{os.getpid()}-{id(self):x}.sock"
        self.args = list(args)
        if monitor:
            self.args += [
                "--chardev", f"socket,id=blockd_test_qmp,path={self.qmp_path},server=on,wait=off",
                "--monitor", "chardev=blockd_test_qmp",
            ]
        self.monitor = monitor
        self.start_timeout = start_timeout
        if env is None:
            env = blockd_env() if self.command[0] == sys.executable else tool_env()
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.qmp: QMPClient | None = None
        self.stdout = ""
        self.stderr = ""
        self._collected = False

    @property
    def argv(self) -> list[str]:
        return self.command + self.args

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the daemon was not started"
        return self.proc.pid

    def start(self) -> DaemonProcess:
        """Starts the daemon and, with a monitor, connects and negotiates QMP.

        Raises DaemonFailed (with the daemon's stderr) if it exits instead.
        """
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=self.env,
        )
        if self.monitor:
            self.qmp = self._connect()
        return self

    def _connect(self) -> QMPClient:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        delay = 0.005
        while True:
            try:
                return QMPClient(str(self.qmp_path), timeout=60.0)
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            # Not listening yet: wait for the process to exit, for a growing moment at most.
            try:
                self.proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                pass
            else:
                self._collect()
                raise DaemonFailed(
                    f"{self.argv} exited with {self.proc.returncode} before answering QMP:\n{self.stderr}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise DaemonFailed(f"{self.argv} did not answer QMP within {self.start_timeout} s:\n{self.stderr}")
            delay = min(delay * 2, 0.1)

    def _collect(self, timeout: float | None = None) -> None:
        """Reads the rest of the daemon's output once it has exited (or exits within timeout)."""
        assert self.proc is not None
        if self._collected:
            self.proc.wait(timeout)
            return
        out, err = self.proc.communicate(timeout=timeout)
        self._collected = True
        self.stdout += out or ""
        self.stderr += err or ""

    def wait(self, timeout: float | None = 30.0) -> int:
        """Waits for the daemon to exit and returns its status (negative: killed by a signal)."""
        assert self.proc is not None
        try:
            self._collect(timeout)
        except subprocess.TimeoutExpired as error:
            raise DaemonFailed(f"{self.argv} did not exit within {timeout} s") from error
        if self.qmp is not None:
            self.qmp.close()
        return self.proc.returncode

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def quit(self, timeout: float = 30.0) -> int:
        """Sends QMP ``quit`` and waits for the exit status."""
        assert self.qmp is not None
        reply = self.qmp.cmd("quit")
        assert reply == {"return": {}}, reply
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self._collect()

    def stop(self, timeout: float = 30.0) -> int:
        """Stops the daemon if it runs (QMP quit, else SIGTERM) and returns its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            try:
                if self.qmp is not None and self.qmp.connected:
                    self.qmp.cmd("quit")
                else:
                    self.send_signal(signal.SIGTERM)
                return self.wait(timeout)
            except Exception:
                if self.proc.poll() is None:
                    self.send_signal(signal.SIGTERM)
                try:
                    return self.wait(timeout)
                except DaemonFailed:
                    self.kill()
                    raise
        if self.qmp is not None:
            self.qmp.close()
        self._collect()
        return self.proc.returncode

    def close(self) -> None:
        """Stops the daemon (ignoring its status) and removes the temporary directory."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop()
            except Exception:
                self.kill()
        if self._own_dir is not None:
            self._own_dir.cleanup()

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
