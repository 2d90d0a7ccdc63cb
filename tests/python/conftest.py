"""Shared helpers for blockd's Python tests (the fixtures come from blockd.testing.plugin)."""

from __future__ import annotations

import os
import shutil

import pytest

QSD = "/usr/bin/qemu-storage-daemon"

needs_qsd = pytest.mark.skipif(not os.access(QSD, os.X_OK), reason=f"{QSD} missing (Debian qemu-system-common)")
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing (Debian qemu-utils)")
