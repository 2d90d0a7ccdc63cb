"""QMP events: matching and an in-process event queue.

An event is the decoded JSON object QMP sends, e.g.
``{"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"},
"timestamp": {"seconds": 1700000000, "microseconds": 12}}``.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Event", "match_event", "EventQueue"]

Event = dict[str, Any]


def match_event(event: Any, match: Any) -> bool:
    """True if ``match`` is a subset of ``event``.

    Dictionaries match when every key of ``match`` is present in ``event`` and its value matches
    recursively; anything else (lists, strings, numbers, None) must be equal. ``match=None``
    matches everything. This is the rule QEMU's iotests use for ``event_wait``, so a match like
    ``{"data": {"node-name": "n0"}}`` picks one node's event.
    """
    if match is None:
        return True
    if isinstance(match, dict):
        if not isinstance(event, dict):
            return False
        return all(key in event and match_event(event[key], value) for key, value in match.items())
    return bool(event == match)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class EventQueue:
    """The events of one source, in arrival order.

    ``source(timeout)`` returns the next event as JSON text, or None once ``timeout`` seconds have
    passed with nothing; it is the engine's ``next_event``. Events skipped over by ``wait()`` are
    kept, so a later ``get()`` or ``wait()`` still sees them.

    Not thread-safe: use one queue from one thread at a time.
    """

    # How long one blocking call into the source may last when the caller waits forever; the
    # call itself blocks (with the GIL released), this only bounds it so Ctrl-C is seen.
    _SLICE = 1.0

    def __init__(self, source: Callable[[float], str | None]) -> None:
        self._source = source
        self._backlog: collections.deque[Event] = collections.deque()

    def _pull(self, timeout: float | None) -> Event | None:
        deadline = _deadline(timeout)
        while True:
            remaining = _remaining(deadline)
            text = self._source(self._SLICE if remaining is None else min(remaining, self._SLICE))
            if text is not None:
                event: Event = json.loads(text)
                return event
            if remaining is not None and remaining <= self._SLICE:
                return None

    def get(self, timeout: float | None = 0.0) -> Event | None:
        """Returns the next event, waiting up to ``timeout`` seconds (None: forever).

        Returns None if no event arrived in time; the default, 0, does not wait at all.
        """
        if self._backlog:
            return self._backlog.popleft()
        return self._pull(timeout)

    def get_all(self) -> list[Event]:
        """Returns every event that has arrived so far, without waiting."""
        events = list(self._backlog)
        self._backlog.clear()
        while (event := self._pull(0.0)) is not None:
            events.append(event)
        return events

    def wait(self, name: str, match: dict[str, Any] | None = None, timeout: float | None = 60.0) -> Event:
        """Waits for the first event called ``name`` that matches ``match`` (see match_event).

        Events that do not match stay queued. Raises TimeoutError if none arrives within
        ``timeout`` seconds (None: wait forever).
        """
        for index, event in enumerate(self._backlog):
            if event.get("event") == name and match_event(event, match):
                del self._backlog[index]
                return event
        deadline = _deadline(timeout)
        while True:
            event = self._pull(_remaining(deadline))
            if event is None:
                raise TimeoutError(f"no {name} event matching {match!r} within {timeout} s")
            if event.get("event") == name and match_event(event, match):
                return event
            self._backlog.append(event)

    def clear(self) -> None:
        """Discards every event that has arrived so far."""
        self.get_all()

    def __iter__(self) -> Iterator[Event]:
        """Iterates over the events that have arrived so far, without waiting."""
        return iter(self.get_all())
