"""blockd's pytest plugin (registered through the ``pytest11`` entry point).

Fixtures, in the style of QEMU's iotests:

* ``engine`` — a ``blockd.Engine`` in this process, closed after the test.
* ``daemon`` — a factory: ``daemon("--blockdev", "null-co,node-name=n0")`` starts blockd-daemon
  with a QMP monitor and returns a ``DaemonProcess`` (``.qmp`` is its ``QMPClient``). At teardown
  every daemon still running is stopped with QMP ``quit`` and must exit with status 0; set
  ``proc.expected_status`` (or stop it yourself) to check something else.
* ``qsd`` — the same factory for the reference qemu-storage-daemon.
* ``raw_image`` / ``qcow2_image`` — factories: ``raw_image("64M")`` creates an image with
  qemu-img in the test's directory and returns its path.
* ``write_pattern`` / ``verify_pattern`` / ``verify_zero`` — see ``blockd.testing.images``.
* ``assert_event`` / ``assert_no_event`` — event checks for an Engine or a QMPClient.
* ``filters`` — the output filters module (``filters.filter_qmp(...)``).

Markers: ``requires_qsd`` skips when qemu-storage-daemon is missing, ``requires_command(name)``
skips when blockd does not implement a QMP command yet.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..events import Event, match_event
from . import filters as filters_module
from . import images
from .process import QSD, DaemonProcess, blockd_command

__all__ = ["assert_event", "assert_no_event", "blockd_commands"]


def pytest_configure(config: pytest.Config) -> None:
    # Under ./dev asan this process was started with the ASan runtime preloaded; the programs that
    # tests start (qemu-img, nbdinfo, qemu-storage-daemon, ...) must not inherit it, and blockd's
    # own Python processes get it back through blockd_env().
    preload = os.environ.get("BLOCKD_ASAN_PRELOAD")
    if preload and os.environ.get("LD_PRELOAD") == preload:
        del os.environ["LD_PRELOAD"]
    config.addinivalue_line("markers", "requires_qsd: needs /usr/bin/qemu-storage-daemon")
    config.addinivalue_line(
        "markers", "requires_command(name, ...): skip unless blockd implements these QMP commands"
    )


_command_cache: set[str] | None = None


def blockd_commands() -> set[str]:
    """The QMP commands the installed blockd engine implements (from query-commands)."""
    global _command_cache
    if _command_cache is None:
        from ..engine import Engine

        with Engine() as engine:
            _command_cache = {entry["name"] for entry in engine.qmp("query-commands")}
    return _command_cache


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("requires_qsd") and not os.access(QSD, os.X_OK):
        pytest.skip(f"{QSD} is not installed (Debian package qemu-system-common)")
    for marker in item.iter_markers("requires_command"):
        missing = [name for name in marker.args if name not in blockd_commands()]
        if missing:
            pytest.skip(f"blockd does not implement QMP command(s) {', '.join(missing)} yet")


@pytest.fixture
def engine() -> Iterator[Any]:
    """A blockd.Engine in this process; closed (and flushed) after the test."""
    from ..engine import Engine

    with Engine() as instance:
        yield instance


def _daemon_factory(tmp_path: Path, command: list[str]) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(*args: str, monitor: bool = True, **kwargs: Any) -> DaemonProcess:
        proc = DaemonProcess(list(args), command=command, directory=tmp_path, monitor=monitor, **kwargs)
        proc.expected_status = 0  # type: ignore[attr-defined]
        started.append(proc)
        return proc.start()

    yield start
    failures = []
    for proc in started:
        if proc.proc is None:
            continue
        running = proc.proc.poll() is None
        status = proc.stop()
        expected = getattr(proc, "expected_status", 0)
        if running and expected is not None and status != expected:
            failures.append(f"{proc.argv} exited with {status}, expected {expected}:\n{proc.stderr}")
        proc.close()
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Factory for blockd-daemon processes with a QMP client; stopped and checked at teardown."""
    yield from _daemon_factory(tmp_path, blockd_command())


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Factory for qemu-storage-daemon processes (the reference), like ``daemon``."""
    if not os.access(QSD, os.X_OK):
        pytest.skip(f"{QSD} is not installed (Debian package qemu-system-common)")
    yield from _daemon_factory(tmp_path, [QSD])


def _require_qemu_img() -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (Debian package qemu-utils)")


@pytest.fixture
def raw_image(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``raw_image(size, name="disk.raw")`` creates a raw image with qemu-img."""
    _require_qemu_img()
    counter = iter(range(1_000_000))

    def create(size: int | str = "64M", name: str | None = None) -> Path:
        path = tmp_path / (name or f"disk{next(counter)}.raw")
        return images.create_image(path, size, "raw")

    return create


@pytest.fixture
def qcow2_image(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``qcow2_image(size, name=None, *options)`` creates a qcow2 image with qemu-img."""
    _require_qemu_img()
    counter = iter(range(1_000_000))

    def create(size: int | str = "64M", name: str | None = None, *options: str) -> Path:
        path = tmp_path / (name or f"disk{next(counter)}.qcow2")
        return images.create_image(path, size, "qcow2", *options)

    return create


@pytest.fixture
def write_pattern() -> Callable[..., None]:
    """``write_pattern(path_or_nbd, offset, length, seed=0)``."""
    return images.write_pattern


@pytest.fixture
def verify_pattern() -> Callable[..., None]:
    """``verify_pattern(path_or_nbd, offset, length, seed=0)``, checked independently of blockd."""
    return images.verify_pattern


@pytest.fixture
def verify_zero() -> Callable[..., None]:
    """``verify_zero(path_or_nbd, offset, length)``."""
    return images.verify_zero


@pytest.fixture
def filters() -> Any:
    """The output filters module: filter_path, filter_pid, filter_timestamps, filter_qmp, ..."""
    return filters_module


def _wait_event(source: Any, name: str, match: dict[str, Any] | None, timeout: float) -> Event:
    if hasattr(source, "event_wait"):  # QMPClient
        result: Event = source.event_wait(name, timeout=timeout, match=match)
        return result
    events = getattr(source, "events", source)  # Engine or EventQueue
    result = events.wait(name, match=match, timeout=timeout)
    return result


def assert_event(source: Any, name: str, match: dict[str, Any] | None = None, timeout: float = 10.0) -> Event:
    """Asserts that event ``name`` matching ``match`` arrives on ``source`` (an Engine, its
    ``events`` queue or a QMPClient) within ``timeout`` seconds; returns it."""
    try:
        return _wait_event(source, name, match, timeout)
    except TimeoutError:
        raise AssertionError(f"no {name} event matching {match!r} within {timeout} s") from None


def assert_no_event(source: Any, name: str | None = None, match: dict[str, Any] | None = None) -> None:
    """Asserts that no event (or none called ``name`` matching ``match``) has arrived yet."""
    if hasattr(source, "get_events"):
        events = source.get_events(wait=False)
    else:
        events = getattr(source, "events", source).get_all()
    unexpected = [
        event for event in events if (name is None or event.get("event") == name) and match_event(event, match)
    ]
    assert not unexpected, f"unexpected events: {unexpected!r}"


@pytest.fixture(name="assert_event")
def assert_event_fixture() -> Callable[..., Event]:
    return assert_event


@pytest.fixture(name="assert_no_event")
def assert_no_event_fixture() -> Callable[..., None]:
    return assert_no_event
