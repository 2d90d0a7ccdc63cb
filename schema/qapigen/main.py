"""Command line of the generator: python3 -m qapigen --schema S --implemented I --out DIR."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .cpp import Layout
from .errors import SchemaError, SourceInfo
from .gen_commands import gen_commands
from .gen_events import gen_events
from .gen_introspect import gen_introspect
from .gen_types import gen_types
from .gen_visit import gen_visit
from .model import Schema, build_schema
from .parser import parse_schema

_RUNTIME_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpp")


def load_implemented(path: str) -> tuple[list[str], SourceInfo]:
    """Reads implemented.json: {"commands": [names...]}."""
    info = SourceInfo(os.path.basename(path), 1)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise SchemaError(None, f"can't read '{path}': {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SchemaError(SourceInfo(info.fname, e.lineno), f"invalid JSON: {e.msg}") from None
    if (not isinstance(data, dict) or set(data) != {"commands"}
            or not isinstance(data["commands"], list)
            or not all(isinstance(c, str) for c in data["commands"])):
        raise SchemaError(info, "must be an object {\"commands\": [names...]}")
    return data["commands"], info


def load(schema_path: str, implemented_path: str | None) -> Schema:
    """Parses and checks a schema (and the implemented list, when given)."""
    exprs = parse_schema(schema_path)
    implemented, info = (None, None)
    if implemented_path:
        implemented, info = load_implemented(implemented_path)
    return build_schema(exprs, implemented, info)


def generate(schema: Schema) -> dict[str, str]:
    """All output files, by name."""
    layout = Layout(schema)
    out: dict[str, str] = {}
    out["types.h"], out["types.cc"] = gen_types(schema, layout)
    out["visit.h"], out["visit.cc"] = gen_visit(schema, layout)
    out["commands.h"], out["commands.cc"] = gen_commands(schema)
    out["events.h"], out["events.cc"] = gen_events(schema)
    out["introspect.h"], out["introspect.cc"] = gen_introspect(schema)
    for name in ("runtime.h", "runtime.cc"):
        with open(os.path.join(_RUNTIME_DIR, name), encoding="utf-8") as f:
            out[name] = f.read()
    return out


def write_outputs(files: dict[str, str], out_dir: str) -> None:
    """Writes files whose content changed (so unchanged outputs keep their timestamps)."""
    os.makedirs(out_dir, exist_ok=True)
    for name, text in files.items():
        path = os.path.join(out_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                if f.read() == text:
                    continue
        except OSError:
            pass
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qapigen", description=__doc__)
    ap.add_argument("--schema", required=True, help="top-level schema file")
    ap.add_argument("--implemented", help="JSON list of commands with hand-written handlers")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--stamp", help="file to touch after a successful run")
    args = ap.parse_args(argv)
    try:
        schema = load(args.schema, args.implemented)
    except SchemaError as e:
        print(f"qapigen: {e}", file=sys.stderr)
        return 1
    write_outputs(generate(schema), args.out)
    if args.stamp:
        with open(args.stamp, "w", encoding="utf-8") as f:
            f.write("")
    return 0
