"""Imports that tests of real clients share: the compiled engine and Debian's libnbd binding.

Both are optional at import time so that a test module can skip with a precise reason instead of
failing to collect.
"""

from __future__ import annotations

import sys
from types import ModuleType


def import_core() -> ModuleType:
    """blockd._core, or a module-level pytest skip saying why it cannot be imported."""
    try:
        import blockd._core as core
    except ImportError as error:  # pragma: no cover - depends on the installation
        import pytest

        pytest.skip(f"blockd._core is not importable ({error}); install the package with 'pip install .'",
                    allow_module_level=True)
    return core


def import_libnbd() -> ModuleType | None:
    """libnbd's Python module (python3-libnbd), or None when it is not installed.

    Debian installs it for the system interpreter only; its extension module is ABI-compatible with
    any CPython of the same minor version, so a venv without system site-packages can still use it.
    """
    try:
        import nbd
    except ImportError:
        if "/usr/lib/python3/dist-packages" not in sys.path:
            sys.path.append("/usr/lib/python3/dist-packages")
        try:
            import nbd
        except ImportError:
            return None
    return nbd
