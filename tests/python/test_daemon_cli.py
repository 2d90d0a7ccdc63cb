"""blockd-daemon's command line: qemu-storage-daemon's options, errors, signals, pidfile."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import blockd
from blockd.cli import OptionError, parse_argv, parse_chardev
from blockd.qmp import QMPClient
from blockd.testing import DaemonProcess, blockd_command
from blockd.testing.process import blockd_env

PROGRAM = "blockd-daemon"


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(blockd_command() + list(args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=blockd_env())


def test_parse_argv() -> None:
    options = parse_argv(["--blockdev", "null-co", "--blockdev=raw", "--block", "x", "-Tfoo", "-T", "bar",
                          "--daemonize", "-V"])
    assert [(o.name, o.value, o.location) for o in options] == [
        ("blockdev", "null-co", "--blockdev null-co"),
        ("blockdev", "raw", "--blockdev=raw"),
        ("blockdev", "x", "--block x"),
        ("trace", "foo", "-Tfoo"),
        ("trace", "bar", "-T bar"),
        ("daemonize", None, "--daemonize"),
        ("version", None, "-V"),
    ]
    for argv, message in [
        (["--bogus"], "unrecognized option '--bogus'"),
        (["-x"], "invalid option -- 'x'"),
        (["--blockdev"], "option '--blockdev' requires an argument"),
        (["foo"], "foo: Unexpected argument"),
        (["--daemonize=yes"], "option '--daemonize' doesn't allow an argument"),
    ]:
        with pytest.raises(OptionError) as info:
            parse_argv(argv)
        assert str(info.value) == message


def test_parse_chardev() -> None:
    warnings: list[str] = []
    chardev = parse_chardev("socket,id=c,path=/tmp/x,server,nowait", warnings)
    assert (chardev.id, chardev.path, chardev.server, chardev.wait) == ("c", "/tmp/x", True, False)
    assert len(warnings) == 2 and "short-form boolean option 'server' deprecated" in warnings[0]
    chardev = parse_chardev("socket,id=t,host=127.0.0.1,port=4444,server=on,wait=off", [])
    assert (chardev.host, chardev.port) == ("127.0.0.1", "4444")
    for text, message in [
        ("socket,path=/x", "chardev: no id specified"),
        ("bogus,id=c", "'bogus' is not a valid char driver name"),
        ("socket,id=c,path=/x,bogus=1", "Invalid parameter 'bogus'"),
        ("socket,id=c,server=on", "chardev: socket: no host given"),
        ("socket,id=c,path=/x,server=maybe", "Parameter 'server' expects 'on' or 'off'"),
    ]:
        with pytest.raises(OptionError) as info:
            parse_chardev(text, [])
        assert str(info.value) == message


def test_help_and_version() -> None:
    result = run("-h")
    assert result.returncode == 0 and result.stdout.startswith(f"Usage: {PROGRAM} [options]")
    for option in ("--blockdev", "--chardev", "--daemonize", "--export", "--monitor", "--nbd-server",
                   "--object", "--pidfile", "-T, --trace", "-V, --version"):
        assert option in result.stdout
    # -h wins over options that come before it, as in qemu-storage-daemon
    assert run("--blockdev", "bogus", "--help").returncode == 0
    result = run("-V")
    assert result.returncode == 0 and result.stdout.startswith(f"{PROGRAM} version {blockd.__version__}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unrecognized option '--bogus'"),
        (["-x"], "invalid option -- 'x'"),
        (["--blockdev"], "option '--blockdev' requires an argument"),
        (["foo"], "foo: Unexpected argument"),
        (["--blockdev", "driver=file"], "--blockdev driver=file: Parameter 'filename' is missing"),
        (["--blockdev", "null-co,node-name=n,bogus=1"], "--blockdev null-co,node-name=n,bogus=1: Parameter 'bogus' is unexpected"),
        (["--blockdev", '{"driver":"null-co","node-name":"n","bogus":1}'],
         '--blockdev {"driver":"null-co","node-name":"n","bogus":1}: Parameter \'bogus\' is unexpected'),
        (["--blockdev=null-co,node-name=n,size=abc"], "--blockdev=null-co,node-name=n,size=abc: Parameter 'size' expects integer"),
        (["--blockdev", "null-co,node-name=n", "--blockdev", "null-co,node-name=n"],
         "--blockdev null-co,node-name=n: Duplicate nodes with node-name='n'"),
        (["--blockdev", "help"], "--blockdev help: Help is not available for this option"),
        (["--object", "iothread"], "--object iothread: Parameter 'id' is missing"),
        (["--object", "iothread,id=io0,bogus=1"], "--object iothread,id=io0,bogus=1: Parameter 'bogus' is unexpected"),
        (["--monitor", "c"], '--monitor c: chardev "c" not found'),
        (["--chardev", "socket,path=/tmp/x,server=on,wait=off"], "chardev: no id specified"),
        (["--chardev", "bogus,id=c"], "--chardev bogus,id=c: 'bogus' is not a valid char driver name"),
        (["--pidfile", "/nonexistent/dir/pid"],
         "cannot create PID file: Could not create '/nonexistent/dir/pid': No such file or directory"),
    ],
)
def test_bad_options(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].endswith(message)
    assert result.stderr.startswith(f"{PROGRAM}: ")


def test_failure_leaves_no_socket_or_pidfile(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    pidfile = tmp_path / "pid"
    result = run(
        "--pidfile", str(pidfile),
        "--chardev", f"socket,id=c,path={sock},server=on,wait=off",
        "--monitor", "c2",
    )
    assert result.returncode == 1
    assert result.stderr == f'{PROGRAM}: --monitor c2: chardev "c2" not found\n'
    assert not sock.exists() and not pidfile.exists()

    result = run(
        "--chardev", f"socket,id=c,path={sock},server=on,wait=off",
        "--monitor", "c",
        "--blockdev", "null-co,size=x",
    )
    assert result.returncode == 1
    assert "--blockdev null-co,size=x: Parameter 'size' expects integer" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_monitor_options(tmp_path: Path) -> None:
    sock = tmp_path / "q.sock"
    chardev = f"socket,id=c,path={sock},server=on,wait=off"
    for monitor, message in [
        ("chardev=c,mode=readline", "Only QMP is supported"),
        ("chardev=c,pretty=maybe", "Parameter 'pretty' expects 'on' or 'off'"),
        ("chardev=c,bogus=1", "Parameter 'bogus' is unexpected"),
        ("mode=control", "Parameter 'chardev' is missing"),
    ]:
        result = run("--chardev", chardev, "--monitor", monitor)
        assert result.returncode == 1
        assert result.stderr == f"{PROGRAM}: --monitor {monitor}: {message}\n"
    result = run("--chardev", chardev, "--monitor", "c", "--monitor", "chardev=c")
    assert result.stderr == f"{PROGRAM}: --monitor chardev=c: Device 'c' is in use\n"
    assert not sock.exists()


def test_daemon_answers_qmp(daemon, raw_image) -> None:
    image = raw_image(1 << 20)
    proc = daemon(
        "--blockdev", f"driver=file,node-name=f0,filename={image}",
        "--blockdev", '{"driver": "raw", "node-name": "r0", "file": "f0"}',
        "--object", "iothread,id=io0",
    )
    nodes = proc.qmp.command("query-named-block-nodes", flat=True)
    assert sorted(node["node-name"] for node in nodes) == ["f0", "r0"]
    assert [thread["id"] for thread in proc.qmp.command("query-iothreads")] == ["io0"]
    assert proc.quit() == 0
    assert not proc.qmp_path.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_stop_cleanly(daemon, tmp_path: Path, signum: int) -> None:
    pidfile = tmp_path / "pid"
    proc = daemon("--blockdev", "null-co,node-name=n0", "--pidfile", str(pidfile))
    assert int(pidfile.read_text()) == proc.pid
    proc.send_signal(signum)
    assert proc.wait() == 0
    assert not pidfile.exists() and not proc.qmp_path.exists()
    assert proc.stderr == ""


def test_pidfile_is_locked(daemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    daemon("--pidfile", str(pidfile))
    result = run("--pidfile", str(pidfile))
    assert result.returncode == 1
    assert result.stderr == f"{PROGRAM}: cannot create PID file: Cannot lock pid file: Resource temporarily unavailable\n"
    assert pidfile.exists(), "the loser must not remove the winner's pidfile"


def test_daemonize(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    pidfile = tmp_path / "pid"
    result = run(
        "--daemonize", "--pidfile", str(pidfile),
        "--chardev", f"socket,id=c,path={sock},server=on,wait=off", "--monitor", "c",
        "--blockdev", "null-co,node-name=n0",
    )
    assert result.returncode == 0, result.stderr
    # The parent returns only once the daemon is ready: socket and pidfile are there already.
    assert sock.exists() and pidfile.exists()
    pid = int(pidfile.read_text())
    assert pid != os.getpid()
    with QMPClient(str(sock)) as qmp:
        assert [node["node-name"] for node in qmp.command("query-named-block-nodes")] == ["n0"]
        assert qmp.cmd("quit") == {"return": {}}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)  # not our child: nothing to wait on but the pid itself
    else:
        pytest.fail("the daemon did not exit after quit")
    assert not sock.exists() and not pidfile.exists()


def test_daemonize_failure_reports_error(tmp_path: Path) -> None:
    result = run("--daemonize", "--blockdev", "null-co,node-name=x,size=z")
    assert result.returncode == 1
    assert result.stderr == f"{PROGRAM}: --blockdev null-co,node-name=x,size=z: Parameter 'size' expects integer\n"


def test_tcp_monitor_and_two_monitors(daemon, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    second = tmp_path / "second.sock"
    proc = daemon(
        "--chardev", f"socket,id=t,host=127.0.0.1,port={port},server=on,wait=off",
        "--monitor", "chardev=t,pretty=on",
        "--chardev", f"socket,id=u,path={second},server=on,wait=off",
        "--monitor", "u",
    )
    with QMPClient(("127.0.0.1", port)) as tcp, QMPClient(str(second)) as unix:
        tcp.command("blockdev-add", driver="null-co", node_name="from-tcp")
        names = [node["node-name"] for node in unix.command("query-named-block-nodes")]
        assert names == ["from-tcp"]
    assert proc.quit() == 0
    assert not second.exists()


def test_trace_option_is_accepted(daemon) -> None:
    proc = daemon("-T", "blk_*")
    assert proc.quit() == 0
    assert "-T blk_*: warning:" in proc.stderr


def test_object_help() -> None:
    result = run("--object", "help")
    assert result.returncode == 0
    assert result.stdout.splitlines()[0] == "List of user creatable objects:"
    assert "  iothread" in result.stdout.splitlines()
    result = run("--object", "iothread,help")
    assert result.returncode == 0
    assert result.stdout.splitlines()[0] == "iothread options:"
    assert "  poll-max-ns=<int>" in result.stdout.splitlines()


def test_stale_socket_is_replaced(daemon, tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(stale))
    leftover.close()  # a socket file nobody listens on, as a crashed daemon leaves
    proc = daemon("--chardev", f"socket,id=s,path={stale},server=on,wait=off", "--monitor", "s")
    with QMPClient(str(stale)) as qmp:
        assert "return" in qmp.cmd("query-version")
    assert proc.quit() == 0


def test_python_m_blockd_and_console_script() -> None:
    script = Path(sys.executable).parent / "blockd-daemon"
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    result = subprocess.run([str(script), "-V"], capture_output=True, text=True, timeout=60, env=blockd_env())
    assert result.returncode == 0 and result.stdout.startswith(f"{PROGRAM} version")
