"""QMP over sockets: ``QMPClient`` (synchronous, iotests style) and ``QMPServer`` (serves an
``Engine`` on unix and TCP sockets to any number of monitors)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ExecuteError, ProtocolError, QMPError
from .client import Address, QMPClient, parse_address

if TYPE_CHECKING:
    from .server import QMPServer

__all__ = ["QMPClient", "QMPServer", "Address", "parse_address", "QMPError", "ExecuteError", "ProtocolError"]


def __getattr__(name: str) -> Any:
    # The server needs the compiled engine; import it only when asked for.
    if name == "QMPServer":
        from .server import QMPServer

        return QMPServer
    raise AttributeError(f"module 'blockd.qmp' has no attribute {name!r}")
