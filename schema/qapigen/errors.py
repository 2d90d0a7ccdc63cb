"""Error reporting shared by the parser and the schema model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceInfo:
    """Where a schema element was written: a file (as shown to users) and a line."""

    fname: str
    line: int

    def __str__(self) -> str:
        return f"{self.fname}:{self.line}"


class SchemaError(Exception):
    """A problem in a schema file; str() gives 'file:line: message'."""

    def __init__(self, info: SourceInfo | None, msg: str):
        super().__init__(msg)
        self.info = info
        self.msg = msg

    def __str__(self) -> str:
        if self.info is None:
            return self.msg
        return f"{self.info}: {self.msg}"
