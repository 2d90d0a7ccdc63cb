"""Splits a byte stream into JSON texts, the way QMP peers frame their messages.

QMP does not frame messages with lengths: each side sends JSON values back to back (QEMU ends each
with CRLF; pretty-printed output spans several lines). ``JSONSplitter`` follows bracket depth
outside strings, so it finds where a value ends without parsing it twice, in linear time.
"""

from __future__ import annotations

__all__ = ["JSONSplitter"]

_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")
_SPACE = frozenset(b" \t\r\n")


class JSONSplitter:
    """Accumulates bytes and yields each complete top-level JSON value as bytes."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scan = 0  # how far _buffer has been scanned
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._started = False

    def __len__(self) -> int:
        """The number of buffered bytes not yet returned."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Adds ``data``; returns the values completed by it, in order."""
        self._buffer += data
        out: list[bytes] = []
        buffer = self._buffer
        index = self._scan
        start = 0
        while index < len(buffer):
            byte = buffer[index]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif byte == 0x5C:  # backslash
                    self._escape = True
                elif byte == 0x22:  # closing quote
                    self._in_string = False
                    if self._depth == 0:
                        out.append(bytes(buffer[start : index + 1]))
                        start = index + 1
                        self._started = False
            elif byte == 0x22:
                self._in_string = True
                self._started = True
            elif byte in _OPEN:
                self._depth += 1
                self._started = True
            elif byte in _CLOSE:
                self._depth -= 1
                if self._depth <= 0:
                    self._depth = 0
                    out.append(bytes(buffer[start : index + 1]))
                    start = index + 1
                    self._started = False
            elif byte in _SPACE:
                if not self._started:
                    start = index + 1
                elif self._depth == 0:
                    # the end of a bare scalar (number, true, false, null)
                    out.append(bytes(buffer[start:index]))
                    start = index + 1
                    self._started = False
            else:
                self._started = True
            index += 1
        del buffer[:start]
        self._scan = index - start
        return out
