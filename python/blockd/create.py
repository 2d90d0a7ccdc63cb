"""Creating images through QMP: blockdev-create jobs, waited for through their events.

    import blockd
    with blockd.Engine() as engine:
        blockd.create_image(engine, "/srv/base.qcow2", "qcow2", 10 << 30)
        blockd.create_image(engine, "/srv/top.qcow2", "qcow2", 10 << 30,
                            backing_file="/srv/base.qcow2", backing_fmt="qcow2")

Both functions work with an in-process ``blockd.Engine`` and with a ``blockd.qmp.QMPClient``
connected to blockd-daemon or qemu-storage-daemon. They consume the JOB_STATUS_CHANGE events of
their own job and leave every other event queued.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from .errors import JobFailed

__all__ = ["blockdev_create", "create_image"]

_counter = itertools.count(1)


def _unique(prefix: str) -> str:
    # Job ids and node names: a letter first, under 32 characters.
    return f"{prefix}{os.getpid() % 100000}-{next(_counter)}"


class _Session:
    """The two things the helpers need from an Engine or a QMPClient."""

    def __init__(self, qmp: Any) -> None:
        if hasattr(qmp, "event_wait"):  # blockd.qmp.QMPClient
            self.command: Callable[..., Any] = qmp.command
            self._wait = lambda match, timeout: qmp.event_wait("JOB_STATUS_CHANGE", timeout=timeout, match=match)
        elif hasattr(qmp, "events"):  # blockd.Engine
            self.command = qmp.qmp
            self._wait = lambda match, timeout: qmp.events.wait("JOB_STATUS_CHANGE", match=match, timeout=timeout)
        else:
            raise TypeError(f"expected a blockd.Engine or a blockd.qmp.QMPClient, not {type(qmp).__name__}")

    def job_event(self, job_id: str, timeout: float) -> str:
        """Waits for the next JOB_STATUS_CHANGE of ``job_id``; returns its status."""
        event = self._wait({"data": {"id": job_id}}, timeout)
        return str(event["data"]["status"])


def blockdev_create(qmp: Any, options: Mapping[str, Any], *, job_id: str | None = None, timeout: float = 600.0) -> None:
    """Runs ``blockdev-create`` with ``options`` (a BlockdevCreateOptions dict, QMP spelling)
    and waits until its job concludes, then dismisses the job.

    Raises ``JobFailed`` (with the job's error) if the job failed, ``ExecuteError`` if the
    command itself was refused (an unsupported driver, a job id in use), and ``TimeoutError``
    (after cancelling the job) if it did not conclude within ``timeout`` seconds.
    """
    session = _Session(qmp)
    job_id = job_id or _unique("create-")
    session.command("blockdev-create", {"job-id": job_id, "options": dict(options)})
    deadline = time.monotonic() + timeout
    try:
        while session.job_event(job_id, max(0.0, deadline - time.monotonic())) != "concluded":
            pass
    except TimeoutError:
        session.command("job-cancel", id=job_id)
        while session.job_event(job_id, 60.0) != "concluded":
            pass
        _dismiss(session, job_id)
        raise TimeoutError(f"blockdev-create job {job_id!r} did not finish within {timeout} s") from None
    error = next((job.get("error") for job in session.command("query-jobs") if job["id"] == job_id), None)
    _dismiss(session, job_id)
    if error is not None:
        raise JobFailed(job_id, error)


def _dismiss(session: _Session, job_id: str) -> None:
    session.command("job-dismiss", id=job_id)
    session.job_event(job_id, 60.0)  # "null"


def create_image(
    qmp: Any,
    path: str | os.PathLike[str],
    fmt: str,
    size: int,
    *,
    cluster_size: int | None = None,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    preallocation: str | None = None,
    version: str | None = None,
    lazy_refcounts: bool | None = None,
    refcount_bits: int | None = None,
    timeout: float = 600.0,
) -> None:
    """Creates an image file at ``path``: ``fmt`` "raw" (a plain file) or "qcow2".

    ``size`` is the virtual size in bytes. The keyword options are those of
    BlockdevCreateOptionsQcow2 (``version`` is "v2" or "v3"); only ``preallocation`` applies to
    raw images too. An existing file at ``path`` is overwritten.

    Runs one blockdev-create job for the file and, for qcow2, a second one for the format on a
    temporary file node, which is removed again. Raises ``JobFailed`` with QEMU's error text when
    a job fails (e.g. an invalid cluster size), ``ValueError`` for an unknown format or an option
    the format does not have.
    """
    filename = os.fspath(path)
    if fmt == "raw":
        qcow2_only = {"cluster_size": cluster_size, "backing_file": backing_file, "backing_fmt": backing_fmt,
                      "version": version, "lazy_refcounts": lazy_refcounts, "refcount_bits": refcount_bits}
        given = sorted(name for name, value in qcow2_only.items() if value is not None)
        if given:
            raise ValueError(f"raw images have no option {', '.join(given)}")
        file_options: dict[str, Any] = {"driver": "file", "filename": filename, "size": size}
        if preallocation is not None:
            file_options["preallocation"] = preallocation
        blockdev_create(qmp, file_options, timeout=timeout)
        return
    if fmt != "qcow2":
        raise ValueError(f"cannot create images of format {fmt!r} (only 'raw' and 'qcow2')")

    blockdev_create(qmp, {"driver": "file", "filename": filename, "size": 0}, timeout=timeout)
    session = _Session(qmp)
    node_name = _unique("create-")
    session.command("blockdev-add", {"driver": "file", "node-name": node_name, "filename": filename})
    try:
        options: dict[str, Any] = {"driver": "qcow2", "file": node_name, "size": size}
        for name, value in (("cluster-size", cluster_size), ("backing-file", backing_file),
                            ("backing-fmt", backing_fmt), ("preallocation", preallocation),
                            ("version", version), ("lazy-refcounts", lazy_refcounts),
                            ("refcount-bits", refcount_bits)):
            if value is not None:
                options[name] = value
        blockdev_create(qmp, options, timeout=timeout)
    finally:
        session.command("blockdev-del", {"node-name": node_name})
