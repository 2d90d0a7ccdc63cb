"""Command-line parsing for blockd-daemon, with qemu-storage-daemon's syntax.

This module only parses: ``parse_argv`` splits the command line the way getopt_long does for
qemu-storage-daemon, ``parse_qemu_opts`` reads the legacy ``QemuOpts`` syntax that ``--chardev``
uses, and ``parse_monitor`` reads ``--monitor``. ``daemon.py`` acts on the results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "OptionError",
    "Option",
    "parse_argv",
    "parse_qemu_opts",
    "parse_bool",
    "ChardevOptions",
    "parse_chardev",
    "MonitorOptions",
    "parse_monitor",
]


class OptionError(Exception):
    """A command-line error; ``str()`` is the message without the program name."""


@dataclass(frozen=True)
class Option:
    """One option of the command line.

    ``name`` is the long name (``"blockdev"``, ``"help"``, ...), ``value`` its argument or None,
    and ``location`` the option as the user wrote it, for messages (``"--blockdev null-co"`` or
    ``"--blockdev=null-co"``).
    """

    name: str
    value: str | None
    location: str


# long name -> takes an argument; the short options are -h, -T and -V, as in qemu-storage-daemon
LONG_OPTIONS: dict[str, bool] = {
    "blockdev": True,
    "chardev": True,
    "daemonize": False,
    "export": True,
    "help": False,
    "monitor": True,
    "nbd-server": True,
    "object": True,
    "pidfile": True,
    "trace": True,
    "version": False,
}
SHORT_OPTIONS: dict[str, str] = {"h": "help", "T": "trace", "V": "version"}


def parse_argv(argv: list[str]) -> list[Option]:
    """Splits ``argv`` (without the program name) into options, in order.

    Follows getopt_long: ``--name value`` and ``--name=value``, unambiguous prefixes of long
    names, ``-Tvalue`` and ``-T value``, ``--`` ends the options. A stray argument is an error,
    as in qemu-storage-daemon. Raises OptionError with getopt's wording.
    """
    options: list[Option] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--":
            if index < len(argv):
                raise OptionError(f"{argv[index]}: Unexpected argument")
            break
        if arg.startswith("--"):
            body = arg[2:]
            name, has_value, inline = body.partition("=")
            if name in LONG_OPTIONS:
                full = name
            else:
                candidates = [option for option in LONG_OPTIONS if option.startswith(name)]
                if not candidates:
                    raise OptionError(f"unrecognized option '--{name}'")
                if len(candidates) > 1:
                    choices = " ".join(f"'--{option}'" for option in candidates)
                    raise OptionError(f"option '--{name}' is ambiguous; possibilities: {choices}")
                full = candidates[0]
            if LONG_OPTIONS[full]:
                if has_value:
                    options.append(Option(full, inline, arg))
                elif index < len(argv):
                    options.append(Option(full, argv[index], f"{arg} {argv[index]}"))
                    index += 1
                else:
                    raise OptionError(f"option '--{full}' requires an argument")
            else:
                if has_value:
                    raise OptionError(f"option '--{full}' doesn't allow an argument")
                options.append(Option(full, None, arg))
        elif arg.startswith("-") and len(arg) > 1:
            position = 1
            while position < len(arg):
                letter = arg[position]
                position += 1
                if letter not in SHORT_OPTIONS:
                    raise OptionError(f"invalid option -- '{letter}'")
                full = SHORT_OPTIONS[letter]
                if LONG_OPTIONS[full]:
                    if position < len(arg):
                        options.append(Option(full, arg[position:], arg))
                    elif index < len(argv):
                        options.append(Option(full, argv[index], f"{arg} {argv[index]}"))
                        index += 1
                    else:
                        raise OptionError(f"option requires an argument -- '{letter}'")
                    break
                options.append(Option(full, None, f"-{letter}"))
        else:
            raise OptionError(f"{arg}: Unexpected argument")
    return options


def split_opts(text: str) -> list[str]:
    """Splits ``a=b,c=d`` at each comma; ``,,`` stands for a literal comma."""
    parts: list[str] = []
    current: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == ",":
            if text.startswith(",,", index):
                current.append(",")
                index += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    parts.append("".join(current))
    return parts


_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def parse_bool(name: str, value: Any) -> bool:
    """An on/off parameter as QEMU reads it (on, yes, true, y / off, no, false, n)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
    raise OptionError(f"Parameter '{name}' expects 'on' or 'off'")


def parse_qemu_opts(text: str, implied_key: str | None, warnings: list[str]) -> dict[str, str]:
    """Parses QemuOpts syntax (used by ``--chardev``): ``backend,key=value,flag,noflag``.

    The first item may omit its key (``implied_key``). A bare ``flag`` means ``flag=on`` and
    ``noflag`` means ``flag=off``; both are deprecated, and a warning is appended to ``warnings``.
    A repeated key keeps its last value.
    """
    result: dict[str, str] = {}
    for position, item in enumerate(split_opts(text)):
        key, has_value, value = item.partition("=")
        if has_value:
            result[key] = value
        elif position == 0 and implied_key is not None:
            result[implied_key] = key
        elif key:
            if key.startswith("no") and len(key) > 2:
                result[key[2:]] = "off"
                warnings.append(f"warning: short-form boolean option '{key}' deprecated\n"
                                f"Please use {key[2:]}=off instead")
            else:
                result[key] = "on"
                warnings.append(f"warning: short-form boolean option '{key}' deprecated\n"
                                f"Please use {key}=on instead")
    return result


# The character device back-ends QEMU knows; blockd implements "socket" and "stdio".
QEMU_CHARDEV_BACKENDS = (
    "braille", "dbus", "file", "memory", "msmouse", "mux", "null", "parallel", "pipe", "pty",
    "qemu-vdagent", "ringbuf", "serial", "socket", "spicevmc", "spiceport", "stdio", "testdev",
    "tty", "udp", "vc", "wctablet",
)
SUPPORTED_CHARDEV_BACKENDS = ("socket", "stdio")

# Parameters of -chardev that QEMU accepts for every back-end (a subset of its list: the ones a
# storage daemon may meet), and those of the socket back-end.
_CHARDEV_COMMON = {"backend", "id", "logfile", "logappend", "mux", "signal"}
_CHARDEV_SOCKET = {
    "path", "host", "port", "to", "ipv4", "ipv6", "server", "wait", "nodelay", "telnet",
    "tn3270", "websocket", "reconnect", "tls-creds", "tls-authz", "fd", "abstract", "tight",
    "delay",
}
# Socket parameters blockd accepts; the others are refused with a clear message.
_CHARDEV_SOCKET_SUPPORTED = {"path", "host", "port", "ipv4", "ipv6", "server", "wait", "nodelay", "delay"}


@dataclass(frozen=True)
class ChardevOptions:
    """A ``--chardev`` option, checked."""

    id: str
    backend: str
    path: str | None = None
    host: str | None = None
    port: str | None = None
    server: bool = False
    wait: bool = True
    ipv4: bool | None = None
    ipv6: bool | None = None


def parse_chardev(text: str, warnings: list[str]) -> ChardevOptions:
    """Parses a ``--chardev`` argument (QemuOpts syntax). Raises OptionError."""
    opts = parse_qemu_opts(text, "backend", warnings)
    backend = opts.get("backend", "")
    if "id" not in opts:
        raise OptionError("chardev: no id specified")
    if backend not in QEMU_CHARDEV_BACKENDS:
        raise OptionError(f"'{backend}' is not a valid char driver name")
    known = _CHARDEV_COMMON | (_CHARDEV_SOCKET if backend == "socket" else set())
    for key in opts:
        if key not in known:
            raise OptionError(f"Invalid parameter '{key}'")
    if backend not in SUPPORTED_CHARDEV_BACKENDS:
        raise OptionError(f"chardev backend '{backend}' is not supported by blockd "
                          f"(supported: {', '.join(SUPPORTED_CHARDEV_BACKENDS)})")
    for key in opts:
        if key in _CHARDEV_COMMON - {"backend", "id"} or (
            backend == "socket" and key in _CHARDEV_SOCKET - _CHARDEV_SOCKET_SUPPORTED
        ):
            raise OptionError(f"chardev parameter '{key}' is not supported by blockd")
    if backend == "stdio":
        return ChardevOptions(id=opts["id"], backend=backend)
    path = opts.get("path")
    host = opts.get("host")
    if path is None and host is None:
        raise OptionError("chardev: socket: no host given")
    if path is not None and host is not None:
        raise OptionError("chardev: socket: path and host are mutually exclusive")
    if host is not None and "port" not in opts:
        raise OptionError("chardev: socket: no port given")
    ipv4 = parse_bool("ipv4", opts["ipv4"]) if "ipv4" in opts else None
    ipv6 = parse_bool("ipv6", opts["ipv6"]) if "ipv6" in opts else None
    server = parse_bool("server", opts.get("server", "off"))
    wait = parse_bool("wait", opts.get("wait", "on"))
    if "nodelay" in opts:
        parse_bool("nodelay", opts["nodelay"])
    return ChardevOptions(
        id=opts["id"], backend=backend, path=path, host=host, port=opts.get("port"),
        server=server, wait=wait, ipv4=ipv4, ipv6=ipv6,
    )


@dataclass(frozen=True)
class MonitorOptions:
    """A ``--monitor`` option, checked."""

    chardev: str
    id: str | None = None
    pretty: bool = False


def parse_monitor(text: str, keyval_parse: Any) -> MonitorOptions:
    """Parses a ``--monitor`` argument: keyval with ``chardev`` implied, or JSON.

    ``keyval_parse`` is ``blockd._core.keyval_parse``. Member checks follow QEMU's order (id,
    mode, pretty, chardev, then unexpected members). Raises OptionError.
    """
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as error:
            raise OptionError(f"JSON parse error, {error.msg}") from None
        keyval = False
    else:
        try:
            value = json.loads(keyval_parse(text, "chardev"))
        except ValueError as error:
            raise OptionError(str(error)) from None
        keyval = True
    if not isinstance(value, dict):
        raise OptionError("Invalid parameter type, expected 'object'")

    def string(name: str) -> str | None:
        if name not in value:
            return None
        if not isinstance(value[name], str):
            raise OptionError(f"Invalid parameter type for '{name}', expected: string")
        return value[name]

    monitor_id = string("id")
    mode = string("mode")
    if mode is not None and mode not in ("readline", "control"):
        raise OptionError(f"Parameter 'mode' does not accept value '{mode}'")
    pretty = False
    if "pretty" in value:
        raw = value["pretty"]
        if keyval:
            pretty = parse_bool("pretty", raw)
        elif isinstance(raw, bool):
            pretty = raw
        else:
            raise OptionError("Invalid parameter type for 'pretty', expected: boolean")
    chardev = string("chardev")
    if chardev is None:
        raise OptionError("Parameter 'chardev' is missing")
    for key in value:
        if key not in ("id", "mode", "pretty", "chardev"):
            raise OptionError(f"Parameter '{key}' is unexpected")
    if mode == "readline":
        raise OptionError("Only QMP is supported")
    return MonitorOptions(chardev=chardev, id=monitor_id, pretty=pretty)
