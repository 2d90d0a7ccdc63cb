"""blockd: a block storage engine driven by QMP.

The public API:

* ``blockd.Engine`` — the engine in this process (needs the compiled ``blockd._core``).
* ``blockd.qmp.QMPClient`` / ``blockd.qmp.QMPServer`` — QMP over unix and TCP sockets.
* ``blockd.QMPError`` and its subclasses — see ``blockd.errors``.
* ``blockd.create_image`` / ``blockd.blockdev_create`` — image creation through blockdev-create
  jobs, for an Engine or a QMP client (see ``blockd.create``).
* ``blockd-daemon`` / ``python -m blockd`` — a qemu-storage-daemon compatible daemon.

Only ``Engine`` needs the compiled module; it is imported on first use, so the QMP client works
on a machine where only the pure-Python part is importable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .create import blockdev_create, create_image
from .errors import (
    CommandNotFound,
    ConnectionClosed,
    DeviceNotActive,
    DeviceNotFound,
    ExecuteError,
    GenericError,
    JobFailed,
    KVMMissingCap,
    ProtocolError,
    QMPError,
)
from .events import EventQueue, match_event

if TYPE_CHECKING:
    from .engine import Engine

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "EventQueue",
    "match_event",
    "QMPError",
    "ProtocolError",
    "ConnectionClosed",
    "ExecuteError",
    "GenericError",
    "CommandNotFound",
    "DeviceNotFound",
    "DeviceNotActive",
    "KVMMissingCap",
    "JobFailed",
    "create_image",
    "blockdev_create",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(f"module 'blockd' has no attribute {name!r}")
