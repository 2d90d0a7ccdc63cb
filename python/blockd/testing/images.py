"""Images and data patterns for tests, checked through independent tools.

``write_pattern`` and ``verify_pattern`` put a deterministic pattern at an offset and check it
again, through a path (the image file on disk, read with plain file I/O, never through blockd) or
through an NBD connection made with libnbd (``nbd.NBD`` handle or an ``nbd://``/``nbd+unix://``
URI). The pattern depends on the seed and on the absolute offset, so data written at the wrong
place or read from the wrong place is caught.
"""

from __future__ import annotations

import os
import sys
import shutil
import subprocess
from array import array
from pathlib import Path
from typing import Any, Union

from .process import tool_env

__all__ = [
    "pattern",
    "write_pattern",
    "verify_pattern",
    "verify_zero",
    "qemu_img",
    "qemu_io",
    "create_image",
    "Target",
]

Target = Union[str, "os.PathLike[str]", Any]  # a path, an nbd:// URI, or an nbd.NBD handle

_MULTIPLIER = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def pattern(offset: int, length: int, seed: int = 0) -> bytes:
    """The pattern bytes for ``[offset, offset + length)``.

    Every aligned 8-byte word at byte offset ``o`` holds ``(seed * K + o // 8) * K`` (mod 2**64,
    little endian) for a fixed odd K, so two words (and two seeds) never look alike.
    """
    if length <= 0:
        return b""
    first = offset // 8
    last = (offset + length + 7) // 8
    base = (seed * _MULTIPLIER) & _MASK
    words = array("Q", (((base + index) * _MULTIPLIER) & _MASK for index in range(first, last)))
    if words.itemsize != 8:  # pragma: no cover - every Linux platform has 8-byte 'Q'
        raise RuntimeError("array('Q') is not 64-bit here")
    if sys.byteorder != "little":  # pragma: no cover
        words.byteswap()
    data = words.tobytes()
    skip = offset - first * 8
    return data[skip : skip + length]


def _is_uri(target: Any) -> bool:
    return isinstance(target, str) and target.startswith("nbd")


def _open_nbd(uri: str) -> Any:
    import nbd  # python3-libnbd, from Debian

    handle = nbd.NBD()
    handle.connect_uri(uri)
    return handle


def _write(target: Target, offset: int, data: bytes) -> None:
    if _is_uri(target):
        handle = _open_nbd(target)
        try:
            _write(handle, offset, data)
            handle.flush()
        finally:
            handle.shutdown()
        return
    if hasattr(target, "pwrite"):
        chunk = 32 << 20
        for start in range(0, len(data), chunk):
            target.pwrite(data[start : start + chunk], offset + start)
        return
    fd = os.open(os.fspath(target), os.O_WRONLY)
    try:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(target: Target, offset: int, length: int) -> bytes:
    if _is_uri(target):
        handle = _open_nbd(target)
        try:
            return _read(handle, offset, length)
        finally:
            handle.shutdown()
    if hasattr(target, "pread"):
        chunk = 32 << 20
        parts = [target.pread(min(chunk, length - start), offset + start) for start in range(0, length, chunk)]
        return b"".join(parts)
    with open(os.fspath(target), "rb") as image:
        image.seek(offset)
        data = image.read(length)
    return data + bytes(length - len(data))  # past the end of a file reads as zeroes


def write_pattern(target: Target, offset: int, length: int, seed: int = 0, pattern_offset: int | None = None) -> None:
    """Writes the pattern of ``seed`` at ``offset`` (see ``pattern``) and flushes it.

    ``pattern_offset`` (default: ``offset``) is the position in the pattern to start from; pass
    it when the same data is seen at another offset elsewhere (a raw node with ``offset=``).
    """
    start = offset if pattern_offset is None else pattern_offset
    _write(target, offset, pattern(start, length, seed))


def _first_difference(actual: bytes, expected: bytes) -> int:
    low, high = 0, len(expected)
    while high - low > 64:  # binary search on equal prefixes, then a linear scan
        middle = (low + high) // 2
        if actual[low:middle] != expected[low:middle]:
            high = middle
        else:
            low = middle
    for index in range(low, high):
        if actual[index] != expected[index]:
            return index
    return high


def _check(target: Target, offset: int, actual: bytes, expected: bytes, what: str) -> None:
    if actual == expected:
        return
    index = _first_difference(actual, expected)
    raise AssertionError(
        f"{what} mismatch in {target!r} at offset {offset + index}: "
        f"read {actual[index:index + 16].hex()}, expected {expected[index:index + 16].hex()}"
    )


def verify_pattern(target: Target, offset: int, length: int, seed: int = 0, pattern_offset: int | None = None) -> None:
    """Reads ``[offset, offset + length)`` of ``target`` and asserts it holds the pattern of
    ``seed`` (from ``pattern_offset``, default ``offset``). The AssertionError names the first
    differing offset."""
    start = offset if pattern_offset is None else pattern_offset
    _check(target, offset, _read(target, offset, length), pattern(start, length, seed), "pattern")


def verify_zero(target: Target, offset: int, length: int) -> None:
    """Asserts that ``[offset, offset + length)`` of ``target`` reads as zeroes."""
    _check(target, offset, _read(target, offset, length), bytes(length), "zero")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (Debian package qemu-utils)")
    return path


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs qemu-img with ``args``; returns the completed process (text output)."""
    return subprocess.run([_tool("qemu-img"), *args], capture_output=True, text=True, check=check, env=tool_env())


def qemu_io(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs qemu-io with ``args``, e.g. ``qemu_io("-f", "raw", "-c", "read -P 0x5a 0 4k", path)``."""
    return subprocess.run([_tool("qemu-io"), *args], capture_output=True, text=True, check=check, env=tool_env())


def create_image(path: str | os.PathLike[str], size: int | str, fmt: str = "raw", *options: str) -> Path:
    """Creates an image with ``qemu-img create -f fmt`` (options like ``"cluster_size=4k"``)."""
    args = ["create", "-q", "-f", fmt]
    for option in options:
        args += ["-o", option]
    qemu_img(*args, os.fspath(path), str(size))
    return Path(path)
