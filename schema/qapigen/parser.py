"""Parser for QAPI schema files.

The syntax is a sequence of top-level JSON-like objects with single-quoted
strings, 'true'/'false', lists and dicts, and '#' comments.  A comment block
opened and closed by a line holding only '##' is a documentation block; it
belongs to the definition that immediately follows it.  {'include': 'f.json'}
pulls in another file (relative to the including one), once per file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import SchemaError, SourceInfo


@dataclass
class Doc:
    """A documentation block: its symbol (for '# @Name:' blocks) and sections."""

    info: SourceInfo
    symbol: str | None  # None for free-form blocks (headings, prose)
    member_names: list[tuple[str, SourceInfo]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


@dataclass
class Expression:
    """One top-level definition with where it came from and its documentation."""

    expr: dict
    info: SourceInfo
    doc: Doc | None


class _Lexer:
    """Turns the text of one schema file into tokens, tracking line numbers."""

    def __init__(self, text: str, fname: str):
        self.text = text
        self.fname = fname
        self.pos = 0
        self.line = 1
        self.tok: str | None = None  # one of {}[],: 'S' (string) 'B' (bool) 'D' (doc) None (EOF)
        self.val = None
        self.tok_line = 1

    def info(self, line: int | None = None) -> SourceInfo:
        return SourceInfo(self.fname, self.tok_line if line is None else line)

    def error(self, msg: str, line: int | None = None) -> SchemaError:
        return SchemaError(self.info(line), msg)

    def _at_line_start(self, pos: int) -> bool:
        start = self.text.rfind("\n", 0, pos) + 1
        return self.text[start:pos].strip() == ""

    def next(self) -> None:
        text = self.text
        while True:
            if self.pos >= len(text):
                self.tok, self.tok_line = None, self.line
                return
            ch = text[self.pos]
            self.tok_line = self.line
            if ch == "\n":
                self.line += 1
                self.pos += 1
            elif ch in " \t\r":
                self.pos += 1
            elif ch == "#":
                end = text.find("\n", self.pos)
                end = len(text) if end < 0 else end
                comment = text[self.pos:end]
                if comment.rstrip() == "##" and self._at_line_start(self.pos):
                    self._read_doc()
                    return
                self.pos = end
            elif ch in "{}[],:":
                self.tok = ch
                self.pos += 1
                return
            elif ch == "'":
                self._read_string()
                return
            elif text.startswith("true", self.pos) or text.startswith("false", self.pos):
                word = "true" if text.startswith("true", self.pos) else "false"
                self.tok, self.val = "B", word == "true"
                self.pos += len(word)
                return
            elif ch == '"':
                raise self.error("strings must use single quotes")
            else:
                raise self.error(f"stray '{ch}'")

    def _read_string(self) -> None:
        out = []
        self.pos += 1
        while True:
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                raise self.error("missing closing quote")
            ch = self.text[self.pos]
            self.pos += 1
            if ch == "'":
                break
            if ch == "\\":
                esc = self.text[self.pos:self.pos + 1]
                if esc not in ("\\", "'"):
                    raise self.error(f"unknown escape \\{esc}")
                self.pos += 1
                ch = esc
            elif not ch.isprintable():
                raise self.error("string contains a non-printable character")
            out.append(ch)
        self.tok, self.val = "S", "".join(out)

    def _read_doc(self) -> None:
        """Reads a '##' ... '##' block; the token value is a Doc."""
        start_line = self.line
        lines: list[tuple[str, int]] = []
        self.pos = self.text.find("\n", self.pos)
        while True:
            if self.pos < 0 or self.pos >= len(self.text):
                raise self.error("documentation block is not closed with '##'", start_line)
            self.pos += 1
            self.line += 1
            end = self.text.find("\n", self.pos)
            end = len(self.text) if end < 0 else end
            raw = self.text[self.pos:end].strip()
            self.pos = end
            if raw == "##":
                break
            if not raw.startswith("#"):
                raise self.error(f"documentation block is not closed with '##' before line "
                                 f"{self.line}", start_line)
            body = raw[1:]
            if body and not body.startswith(" "):
                raise self.error("documentation text must follow '# ' (hash, space)")
            lines.append((body[1:], self.line))
        self.tok, self.val = "D", _make_doc(lines, SourceInfo(self.fname, start_line))
        self.tok_line = start_line


def _make_doc(lines: list[tuple[str, int]], info: SourceInfo) -> Doc:
    first = next((text for text, _ in lines if text.strip()), "")
    symbol = None
    if first.startswith("@"):
        if not first.endswith(":") or " " in first:
            raise SchemaError(info, "definition documentation must start with '@Name:'")
        symbol = first[1:-1]
    doc = Doc(info, symbol)
    seen_symbol = False
    for text, line in lines:
        if text.startswith("@"):
            if symbol is not None and not seen_symbol:
                seen_symbol = True
                continue
            name, sep, _ = text[1:].partition(":")
            if not sep or not name or " " in name:
                raise SchemaError(SourceInfo(info.fname, line),
                                  "member documentation must start with '@name:'")
            doc.member_names.append((name, SourceInfo(info.fname, line)))
        doc.text.append(text)
    return doc


class _FileParser:
    def __init__(self, lexer: _Lexer):
        self.lx = lexer

    def value(self):
        lx = self.lx
        tok = lx.tok
        if tok == "{":
            return self.obj()
        if tok == "[":
            return self.array()
        if tok in ("S", "B"):
            val = lx.val
            lx.next()
            return val
        raise lx.error("expected a value" if tok is not None else "unexpected end of file")

    def obj(self) -> dict:
        lx = self.lx
        result: dict = {}
        lx.next()
        if lx.tok == "}":
            lx.next()
            return result
        while True:
            if lx.tok != "S":
                raise lx.error("expected a string key")
            key = lx.val
            if key in result:
                raise lx.error(f"duplicate key '{key}'")
            lx.next()
            if lx.tok != ":":
                raise lx.error("expected ':'")
            lx.next()
            result[key] = self.value()
            if lx.tok == "}":
                lx.next()
                return result
            if lx.tok != ",":
                raise lx.error("expected ',' or '}'")
            lx.next()

    def array(self) -> list:
        lx = self.lx
        result = []
        lx.next()
        if lx.tok == "]":
            lx.next()
            return result
        while True:
            result.append(self.value())
            if lx.tok == "]":
                lx.next()
                return result
            if lx.tok != ",":
                raise lx.error("expected ',' or ']'")
            lx.next()


def parse_schema(path: str) -> list[Expression]:
    """Parses the schema file at `path` and everything it includes.

    File names in errors are shown relative to the directory of `path`.
    Raises SchemaError on the first syntax error.
    """
    root = os.path.dirname(os.path.abspath(path))
    seen: set[str] = set()
    exprs: list[Expression] = []
    _parse_file(os.path.abspath(path), root, seen, exprs, None)
    return exprs


def _parse_file(path: str, root: str, seen: set[str], out: list[Expression],
                from_info: SourceInfo | None) -> None:
    shown = os.path.relpath(path, root)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SchemaError(from_info, f"can't read '{shown}': {e.strerror}") from None
    seen.add(path)
    lx = _Lexer(text, shown)
    parser = _FileParser(lx)
    lx.next()
    pending_doc: Doc | None = None
    while lx.tok is not None:
        if lx.tok == "D":
            doc = lx.val
            if pending_doc is not None and pending_doc.symbol is not None:
                raise SchemaError(pending_doc.info,
                                  f"documentation for '{pending_doc.symbol}' is not followed by its definition")
            pending_doc = doc
            lx.next()
            continue
        if lx.tok != "{":
            raise lx.error("expected '{' to start a top-level expression")
        info = lx.info()
        expr = parser.obj()
        if "include" in expr:
            if len(expr) != 1 or not isinstance(expr["include"], str):
                raise SchemaError(info, "an include must be {'include': 'FILE'} and nothing else")
            target = os.path.normpath(os.path.join(os.path.dirname(path), expr["include"]))
            if target not in seen:
                _parse_file(target, root, seen, out, info)
            continue
        doc = pending_doc if pending_doc is not None and pending_doc.symbol is not None else None
        pending_doc = None
        out.append(Expression(expr, info, doc))
    if pending_doc is not None and pending_doc.symbol is not None:
        raise SchemaError(pending_doc.info,
                          f"documentation for '{pending_doc.symbol}' is not followed by its definition")
