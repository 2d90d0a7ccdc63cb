"""Internal snapshots of a qcow2 node: list, create, delete and revert.

Works over ``blockd.Engine`` in this process (its ``qmp`` method) or a ``blockd.qmp.QMPClient``
connected to a daemon (its ``command`` method) (blockd's, or qemu-storage-daemon's for everything but
``revert``, which is a blockd extension)::

    snaps = InternalSnapshots(engine, "disk0")
    snaps.create("before-upgrade")
    [s["name"] for s in snaps.list()]          # ["before-upgrade"]
    snaps.revert(name="before-upgrade")        # the disk is as it was
    snaps.delete(name="before-upgrade")

Errors are raised as ``blockd.GenericError`` with qemu-storage-daemon's messages.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["InternalSnapshots", "QMPRunner"]


class QMPRunner(Protocol):
    """An Engine (``qmp``) or a QMPClient (``command``): runs a command, raises ExecuteError."""

    def __getattr__(self, name: str) -> Any: ...


def _selector(id: str | None, name: str | None) -> dict[str, str]:
    selector: dict[str, str] = {}
    if id is not None:
        selector["id"] = id
    if name is not None:
        selector["name"] = name
    return selector


class InternalSnapshots:
    """The internal snapshots of the root node ``device`` (a node name)."""

    def __init__(self, runner: QMPRunner, device: str) -> None:
        self.runner = runner
        self.device = device
        self._call = getattr(runner, "qmp", None) or runner.command

    def list(self) -> list[dict[str, Any]]:
        """The snapshots (SnapshotInfo dicts: id, name, date-sec, ...) in image order."""
        for node in self._call("query-named-block-nodes", {"flat": True}):
            if node.get("node-name") == self.device:
                return list(node["image"].get("snapshots", []))
        raise LookupError(f"no node named {self.device!r}")

    def create(self, name: str) -> dict[str, Any]:
        """Takes a snapshot named ``name`` and returns its SnapshotInfo."""
        self._call("blockdev-snapshot-internal-sync", {"device": self.device, "name": name})
        return next(s for s in reversed(self.list()) if s["name"] == name)

    def delete(self, *, id: str | None = None, name: str | None = None) -> dict[str, Any]:
        """Deletes the snapshot with this id and/or name and returns what it was."""
        result: dict[str, Any] = self._call(
            "blockdev-snapshot-delete-internal-sync", {"device": self.device, **_selector(id, name)}
        )
        return result

    def revert(self, *, id: str | None = None, name: str | None = None) -> dict[str, Any]:
        """Makes the snapshot with this id and/or name the current state (blockd only)."""
        result: dict[str, Any] = self._call(
            "x-blockd-snapshot-revert-internal-sync", {"device": self.device, **_selector(id, name)}
        )
        return result
