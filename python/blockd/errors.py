"""The exception tree of blockd's QMP layer.

``QMPError`` is the root of everything this package raises for QMP reasons:

* ``ExecuteError`` — the engine or the daemon ran the command and answered with an error. It carries
  the QMP ``error_class`` and ``desc``; each error class QEMU defines has its own subclass
  (``GenericError``, ``CommandNotFound``, ``DeviceNotFound``, ``DeviceNotActive``,
  ``KVMMissingCap``), so callers can catch exactly the class they expect. An error class this
  module does not know is still raised as a plain ``ExecuteError``.
* ``JobFailed`` — a background job the caller waited for (``blockd.create_image``) concluded with
  an error; it carries the job id and the error text query-jobs gave.
* ``ProtocolError`` — the peer broke the protocol (a reply that is not JSON, a missing greeting, a
  closed connection). Only the socket client raises it.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
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
    "execute_error",
]


class QMPError(Exception):
    """Base class of every QMP error raised by blockd."""


class ProtocolError(QMPError):
    """The peer sent something that QMP does not allow, or the transport failed."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection before the expected message arrived."""


class ExecuteError(QMPError):
    """A command failed: the reply was ``{"error": {"class": ..., "desc": ...}}``.

    Attributes:
        error_class: the QMP error class, e.g. ``"GenericError"``.
        desc: the human-readable description from the reply.
        command: the command that failed, when known.
        response: the whole reply object, when it came from a QMP reply.
    """

    # The QMP error class a subclass stands for; None on the base class.
    qmp_class: ClassVar[str | None] = None
    _by_class: ClassVar[dict[str, type[ExecuteError]]] = {}

    def __init__(
        self,
        error_class: str,
        desc: str,
        command: str | None = None,
        response: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(error_class, desc)
        self.error_class = error_class
        self.desc = desc
        self.command = command
        self.response = response

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.qmp_class is not None:
            ExecuteError._by_class[cls.qmp_class] = cls

    def __str__(self) -> str:
        if self.command:
            return f"{self.command}: {self.error_class}: {self.desc}"
        return f"{self.error_class}: {self.desc}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.error_class!r}, {self.desc!r})"


class GenericError(ExecuteError):
    """The catch-all QMP error class: bad arguments, failed operations."""

    qmp_class = "GenericError"


class CommandNotFound(ExecuteError):
    """The command does not exist, or capabilities were not negotiated yet."""

    qmp_class = "CommandNotFound"


class DeviceNotFound(ExecuteError):
    """The named device, node or object does not exist."""

    qmp_class = "DeviceNotFound"


class DeviceNotActive(ExecuteError):
    """The device exists but is not in a state the command needs."""

    qmp_class = "DeviceNotActive"


class KVMMissingCap(ExecuteError):
    """A KVM capability is missing (never raised by blockd; kept for completeness)."""

    qmp_class = "KVMMissingCap"


def execute_error(
    error_class: str,
    desc: str,
    command: str | None = None,
    response: dict[str, Any] | None = None,
) -> ExecuteError:
    """Builds the ``ExecuteError`` subclass that matches ``error_class``."""
    cls = ExecuteError._by_class.get(error_class, ExecuteError)
    return cls(error_class, desc, command=command, response=response)


def raise_for_response(response: dict[str, Any], command: str | None = None) -> Any:
    """Returns the ``return`` member of a QMP reply, or raises its error as an ExecuteError."""
    if "error" in response:
        error = response["error"]
        if not isinstance(error, dict):
            raise ProtocolError(f"malformed error reply: {response!r}")
        raise execute_error(
            str(error.get("class", "GenericError")),
            str(error.get("desc", "")),
            command=command,
            response=response,
        )
    if "return" not in response:
        raise ProtocolError(f"reply has neither 'return' nor 'error': {response!r}")
    return response["return"]


class JobFailed(QMPError):
    """A background job (blockdev-create, ...) concluded with an error.

    Attributes:
        job_id: the job's identifier.
        error: the error query-jobs reported for it, e.g.
            ``"Cluster size must be a power of two between 512 and 2048k"``.
    """

    def __init__(self, job_id: str, error: str) -> None:
        super().__init__(job_id, error)
        self.job_id = job_id
        self.error = error

    def __str__(self) -> str:
        return f"job {self.job_id!r} failed: {self.error}"
