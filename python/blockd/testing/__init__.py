"""Test helpers for blockd and its users, in the style of QEMU's iotests.

The pytest fixtures live in ``blockd.testing.plugin`` (loaded automatically through the
``pytest11`` entry point when blockd is installed). The helpers can be used without pytest too.
"""

from __future__ import annotations

from .filters import filter_all, filter_path, filter_pid, filter_qmp, filter_qmp_event, filter_timestamps
from .images import create_image, pattern, qemu_img, qemu_io, verify_pattern, verify_zero, write_pattern
from .process import QSD, DaemonFailed, DaemonProcess, blockd_command

__all__ = [
    "DaemonProcess",
    "DaemonFailed",
    "QSD",
    "blockd_command",
    "create_image",
    "pattern",
    "qemu_img",
    "qemu_io",
    "write_pattern",
    "verify_pattern",
    "verify_zero",
    "filter_all",
    "filter_path",
    "filter_pid",
    "filter_qmp",
    "filter_qmp_event",
    "filter_timestamps",
]
