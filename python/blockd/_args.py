"""Turning Python keyword arguments into QMP arguments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["qmp_arguments"]


def qmp_arguments(arguments: Mapping[str, Any] | None, keywords: Mapping[str, Any]) -> dict[str, Any]:
    """Merges a QMP arguments dict and Python keyword arguments into one dict.

    Keyword names have each ``_`` turned into ``-`` (``node_name=`` becomes ``"node-name"``), so
    that QMP names read naturally in Python. Only the top-level keyword names are renamed; keys of
    the ``arguments`` dict and of nested dicts are sent exactly as given, so pass nested members
    with their QMP spelling (``cache={"no-flush": True}``). Keywords override entries of the dict.
    """
    merged: dict[str, Any] = dict(arguments or {})
    for key, value in keywords.items():
        merged[key.replace("_", "-")] = value
    return merged
