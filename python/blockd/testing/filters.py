"""Output filters, so that golden output does not depend on paths, process ids or times.

Each filter takes text (or a decoded QMP message, for the ``qmp`` ones) and returns it with the
volatile parts replaced by fixed placeholders, as QEMU's iotests do.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

__all__ = [
    "filter_path",
    "filter_pid",
    "filter_timestamps",
    "filter_qmp_event",
    "filter_qmp",
    "filter_all",
]

_TIMESTAMP_TEXT = re.compile(r'"timestamp":\s*\{\s*"seconds":\s*\d+,\s*"microseconds":\s*\d+\s*\}')
_TIMESTAMP_TEXT_REVERSED = re.compile(r'"timestamp":\s*\{\s*"microseconds":\s*\d+,\s*"seconds":\s*\d+\s*\}')


def filter_path(text: str, path: str | os.PathLike[str], placeholder: str = "TEST_DIR") -> str:
    """Replaces ``path`` (and its resolved form) with ``placeholder``."""
    raw = os.fspath(path)
    for variant in sorted({raw, os.path.realpath(raw)}, key=len, reverse=True):
        text = text.replace(variant, placeholder)
    return text


def filter_pid(text: str, pid: int | None = None, placeholder: str = "PID") -> str:
    """Replaces ``pid`` (or, without one, every ``pid N``/``PID N``/``[N]`` looking number)."""
    if pid is not None:
        return re.sub(rf"\b{pid}\b", placeholder, text)
    text = re.sub(r"\b(pid|PID)(\s*[=:]?\s*)\d+", rf"\1\2{placeholder}", text)
    return re.sub(r"\[\d+\]", f"[{placeholder}]", text)


def filter_timestamps(text: str) -> str:
    """Replaces QMP event timestamps in JSON text with a fixed one."""
    fixed = '"timestamp": {"seconds": "SECS", "microseconds": "USECS"}'
    return _TIMESTAMP_TEXT_REVERSED.sub(fixed, _TIMESTAMP_TEXT.sub(fixed, text))


def filter_qmp_event(event: dict[str, Any]) -> dict[str, Any]:
    """A copy of a decoded event with its timestamp replaced by placeholders."""
    event = copy.deepcopy(event)
    if "timestamp" in event:
        event["timestamp"] = {"seconds": "SECS", "microseconds": "USECS"}
    return event


def filter_qmp(message: Any, path: str | os.PathLike[str] | None = None) -> Any:
    """A copy of a decoded QMP message with timestamps and (if given) ``path`` filtered in
    every string."""
    if isinstance(message, dict):
        result = {key: filter_qmp(value, path) for key, value in message.items()}
        if "timestamp" in result and isinstance(result["timestamp"], dict):
            result["timestamp"] = {"seconds": "SECS", "microseconds": "USECS"}
        return result
    if isinstance(message, list):
        return [filter_qmp(value, path) for value in message]
    if isinstance(message, str) and path is not None:
        return filter_path(message, path)
    return message


def filter_all(text: str, path: str | os.PathLike[str] | None = None, pid: int | None = None) -> str:
    """Paths, pids and timestamps together."""
    if path is not None:
        text = filter_path(text, path)
    if pid is not None:
        text = filter_pid(text, pid)
    return filter_timestamps(text)
