"""Tests of the QAPI generator: rejected schemas, golden output, and the real schema.

Set QAPIGEN_UPDATE_GOLDEN=1 to rewrite the golden files from the current generator
(then review the diff before committing).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from qapigen.errors import SchemaError
from qapigen.gen_introspect import introspection
from qapigen.main import generate, load

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
SCHEMA_DIR = os.path.join(ROOT, "schema")
UPDATE = os.environ.get("QAPIGEN_UPDATE_GOLDEN") == "1"

BAD = sorted(glob.glob(os.path.join(HERE, "bad", "*.json")))


def check_golden(path: str, actual: str) -> None:
    if UPDATE:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(actual)
        return
    with open(path, encoding="utf-8") as f:
        expected = f.read()
    assert actual == expected, f"output differs from {os.path.relpath(path, ROOT)}"


@pytest.mark.parametrize("schema", BAD, ids=[os.path.basename(p) for p in BAD])
def test_bad_schema_is_rejected_with_precise_message(schema):
    with pytest.raises(SchemaError) as excinfo:
        load(schema, None)
    check_golden(schema[:-len(".json")] + ".err", str(excinfo.value) + "\n")


def test_implemented_command_must_exist(tmp_path):
    impl = tmp_path / "implemented.json"
    impl.write_text('{"commands": ["draw", "erase"]}')
    with pytest.raises(SchemaError) as excinfo:
        load(os.path.join(HERE, "good", "simple.json"), str(impl))
    assert str(excinfo.value) == "implemented.json:1: implemented command 'erase' is not in the schema"


def test_implemented_file_shape(tmp_path):
    impl = tmp_path / "implemented.json"
    impl.write_text('["draw"]')
    with pytest.raises(SchemaError) as excinfo:
        load(os.path.join(HERE, "good", "simple.json"), str(impl))
    assert "must be an object" in str(excinfo.value)


def test_good_schema_golden_output():
    schema = load(os.path.join(HERE, "good", "simple.json"),
                  os.path.join(HERE, "good", "simple-implemented.json"))
    files = generate(schema)
    for name, text in sorted(files.items()):
        if name.startswith("runtime."):
            continue  # copied verbatim, not generated
        check_golden(os.path.join(HERE, "good", "simple.golden", name), text)
    check_golden(os.path.join(HERE, "good", "simple.golden", "introspection.json"),
                 json.dumps(introspection(schema), indent=1) + "\n")


def test_good_schema_introspection_follows_qemu_rules():
    schema = load(os.path.join(HERE, "good", "simple.json"),
                  os.path.join(HERE, "good", "simple-implemented.json"))
    entries = introspection(schema)
    names = [e["name"] for e in entries]
    # Implemented commands and all events, in schema order, come first.
    assert names[:4] == ["draw", "paint", "SHAPE_DRAWN", "RESET"]
    assert "hidden" not in names
    by_name = {e["name"]: e for e in entries}
    draw = by_name["draw"]
    assert draw["features"] == ["deprecated"]
    assert draw["arg-type"] == "0" and draw["ret-type"] == "[1]"
    args = by_name["0"]
    assert args["members"][0] == {"name": "shape", "type": "2"}
    assert args["members"][1] == {"name": "scale", "type": "number", "default": None}
    point = by_name["1"]
    # Base members first; every integer type shows as 'int'.
    assert [m["name"] for m in point["members"]] == ["id", "x", "y-pos", "default", "tags"]
    assert point["members"][1]["type"] == "int"
    assert point["members"][4]["type"] == "[str]"
    shape = by_name["2"]
    assert shape["tag"] == "color"
    # Every tag value gets a variant; '144' has no branch and maps to the empty object.
    cases = [v["case"] for v in shape["variants"]]
    assert cases == ["red", "dark-blue", "144"]
    empty = by_name[shape["variants"][2]["type"]]
    assert empty["members"] == [] and empty["meta-type"] == "object"
    assert by_name["RESET"]["arg-type"] == empty["name"]
    color = by_name[by_name[by_name["SHAPE_DRAWN"]["arg-type"]]["members"][0]["type"]]
    assert color["values"] == ["red", "dark-blue", "144"]
    assert color["members"] == [{"name": "red"}, {"name": "dark-blue"}, {"name": "144"}]
    # Every referenced type is described exactly once.
    assert len(names) == len(set(names))


def test_cli_reports_errors_and_exit_status(tmp_path):
    env = dict(os.environ, PYTHONPATH=SCHEMA_DIR)
    proc = subprocess.run(
        [sys.executable, "-m", "qapigen", "--schema", os.path.join(HERE, "bad", "unknown-type.json"),
         "--out", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert proc.stderr == "qapigen: unknown-type.json:4: member 'b' of struct 'Foo' uses unknown type 'Bar'\n"
    proc = subprocess.run(
        [sys.executable, "-m", "qapigen", "--schema", os.path.join(HERE, "good", "simple.json"),
         "--implemented", os.path.join(HERE, "good", "simple-implemented.json"),
         "--out", str(tmp_path / "out"), "--stamp", str(tmp_path / "stamp")],
        env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        f"{n}.{e}" for n in ("types", "visit", "commands", "events", "introspect", "runtime")
        for e in ("h", "cc"))
    assert (tmp_path / "stamp").exists()


# ---- the real schema -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def real():
    return load(os.path.join(SCHEMA_DIR, "blockd.json"), os.path.join(SCHEMA_DIR, "implemented.json"))


def test_real_schema_generates(real):
    files = generate(real)
    assert "qmp_blockdev_add(qmp::Context& ctx, const BlockdevOptions& args)" in files["commands.h"]
    assert "Status qmp_quit(qmp::Context& ctx);" in files["commands.h"]
    assert "Expected<std::vector<BlockDeviceInfo>> qmp_query_named_block_nodes(" \
           "qmp::Context& ctx, const QueryNamedBlockNodesArgs& args);" in files["commands.h"]
    assert "void emit_quorum_report_bad(qmp::EventBus& bus, const QuorumReportBadEvent& data);" \
        in files["events.h"]
    # Recursion through BlockdevRef is broken with a Box in the alternate.
    assert "struct BlockdevRef : std::variant<Box<BlockdevOptions>, std::string>" in files["types.h"]
    assert "std::optional<Box<ImageInfo>> backing_image;" in files["types.h"]


def test_real_schema_introspection(real):
    entries = introspection(real)
    by_name = {e["name"]: e for e in entries}
    commands = [e["name"] for e in entries if e["meta-type"] == "command"]
    assert sorted(commands) == sorted(real.implemented)
    events = [e["name"] for e in entries if e["meta-type"] == "event"]
    assert sorted(events) == sorted(e.name for e in real.events)
    assert by_name["str"] == {"name": "str", "meta-type": "builtin", "json-type": "string"}
    assert by_name["int"] == {"name": "int", "meta-type": "builtin", "json-type": "int"}
    masked = [e["name"] for e in entries if e["meta-type"] in ("object", "enum", "alternate")]
    assert masked == sorted(masked, key=int)  # numbered in order of first use
    # Every type reference resolves.
    def refs(e):
        for key in ("arg-type", "ret-type", "element-type"):
            if key in e:
                yield e[key]
        for m in e.get("members", []):
            if "type" in m:
                yield m["type"]
        for v in e.get("variants", []):
            yield v["type"]
    for e in entries:
        for r in refs(e):
            assert r in by_name, (e["name"], r)
    add = by_name[by_name["blockdev-add"]["arg-type"]]
    assert add["tag"] == "driver"
    assert [v["case"] for v in add["variants"]] == [
        "blkdebug", "file", "nbd", "null-co", "qcow2", "quorum", "raw"]
    file_opts = by_name[next(v["type"] for v in add["variants"] if v["case"] == "file")]
    assert file_opts["features"] == ["dynamic-auto-read-only"]
    assert {"name": "x-check-cache-dropped", "type": "bool", "default": None,
            "features": ["unstable"]} in file_opts["members"]
