"""Our query-qmp-schema against qemu-storage-daemon 7.2's, for every command and event both have.

Introspection masks most type names (as "1", "2", ...), so types are compared by structure:
meta-type, members (names, types, optional-ness), variants, enum values, array elements and
alternate branches, recursively. Deliberate reductions are allowed in one place only: the enum
of block drivers (BlockdevDriver) and of object types (ObjectType), and the union branches they
select (BlockdevOptions, ObjectOptions), may be subsets of qemu-storage-daemon's.
"""

from __future__ import annotations

from typing import Any

import pytest

from blockd import Engine
from blockd.testing import QSD, DaemonProcess

pytestmark = pytest.mark.requires_qsd

Schema = dict[str, dict[str, Any]]


def index(entities: list[dict[str, Any]]) -> Schema:
    return {entity["name"]: entity for entity in entities}


@pytest.fixture(scope="module")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> tuple[Schema, Schema]:
    with Engine() as engine:
        ours = index(engine.qmp("query-qmp-schema"))
    with DaemonProcess([], command=[QSD], directory=tmp_path_factory.mktemp("qsd")) as proc:
        assert proc.qmp is not None
        theirs = index(proc.qmp.command("query-qmp-schema"))
        assert proc.quit() == 0
    return ours, theirs


def reducible_enum(entity: dict[str, Any]) -> bool:
    """BlockdevDriver or ObjectType, recognised by what they list."""
    values = set(entity.get("values", []))
    return {"null-co", "raw", "file"} <= values or {"iothread", "secret"} <= values


class Comparer:
    def __init__(self, ours: Schema, theirs: Schema) -> None:
        self.ours = ours
        self.theirs = theirs
        self.seen: set[tuple[str, str]] = set()
        self.problems: list[str] = []

    def problem(self, path: str, text: str) -> None:
        self.problems.append(f"{path}: {text}")

    def compare(self, ours_name: str, theirs_name: str, path: str) -> None:
        if (ours_name, theirs_name) in self.seen:
            return
        self.seen.add((ours_name, theirs_name))
        ours = self.ours.get(ours_name)
        theirs = self.theirs.get(theirs_name)
        if ours is None or theirs is None:
            self.problem(path, f"type {ours_name!r}/{theirs_name!r} missing from a schema")
            return
        meta = theirs["meta-type"]
        if ours["meta-type"] != meta:
            self.problem(path, f"meta-type {ours['meta-type']} instead of {meta}")
            return
        if meta == "builtin":
            if (ours["name"], ours["json-type"]) != (theirs["name"], theirs["json-type"]):
                self.problem(path, f"builtin {ours['name']} instead of {theirs['name']}")
        elif meta == "enum":
            self.compare_enum(ours, theirs, path)
        elif meta == "array":
            self.compare(ours["element-type"], theirs["element-type"], path + "[]")
        elif meta == "alternate":
            ours_branches = [member["type"] for member in ours["members"]]
            theirs_branches = [member["type"] for member in theirs["members"]]
            if len(ours_branches) != len(theirs_branches):
                self.problem(path, f"alternate with {len(ours_branches)} branches instead of {len(theirs_branches)}")
                return
            for position, (mine, reference) in enumerate(zip(ours_branches, theirs_branches)):
                self.compare(mine, reference, f"{path}<alt {position}>")
        elif meta == "object":
            self.compare_object(ours, theirs, path)
        else:
            self.problem(path, f"unexpected meta-type {meta}")

    def compare_enum(self, ours: dict[str, Any], theirs: dict[str, Any], path: str) -> None:
        mine, reference = ours["values"], theirs["values"]
        if mine == reference:
            return
        if reducible_enum(theirs) and set(mine) <= set(reference):
            return
        missing = [value for value in reference if value not in mine]
        extra = [value for value in mine if value not in reference]
        if not missing and not extra:
            self.problem(path, f"enum values in another order: {mine} vs {reference}")
        else:
            self.problem(path, f"enum differs: missing {missing}, extra {extra}")

    def compare_object(self, ours: dict[str, Any], theirs: dict[str, Any], path: str) -> None:
        mine = {member["name"]: member for member in ours["members"]}
        reference = {member["name"]: member for member in theirs["members"]}
        if list(mine) != list(reference):
            missing = [name for name in reference if name not in mine]
            extra = [name for name in mine if name not in reference]
            if missing or extra:
                self.problem(path, f"members differ: missing {missing}, extra {extra}")
            else:
                self.problem(path, f"members in another order: {list(mine)} vs {list(reference)}")
        for name in reference:
            if name not in mine:
                continue
            optional_mine = "default" in mine[name]
            optional_reference = "default" in reference[name]
            if optional_mine != optional_reference:
                state = "optional" if optional_mine else "mandatory"
                self.problem(f"{path}.{name}", f"{state} here but not in qemu-storage-daemon")
            self.compare(mine[name]["type"], reference[name]["type"], f"{path}.{name}")
        if ("tag" in ours) != ("tag" in theirs) or ours.get("tag") != theirs.get("tag"):
            self.problem(path, f"tag {ours.get('tag')} instead of {theirs.get('tag')}")
            return
        if "tag" not in theirs:
            return
        tag_type = self.theirs[reference[theirs["tag"]]["type"]]
        mine_variants = {variant["case"]: variant["type"] for variant in ours.get("variants", [])}
        reference_variants = {variant["case"]: variant["type"] for variant in theirs.get("variants", [])}
        if set(mine_variants) != set(reference_variants):
            if not (reducible_enum(tag_type) and set(mine_variants) <= set(reference_variants)):
                self.problem(path, f"variants differ: {sorted(mine_variants)} vs {sorted(reference_variants)}")
        for case, variant_type in mine_variants.items():
            if case in reference_variants:
                self.compare(variant_type, reference_variants[case], f"{path}<{case}>")


def entities_of(schema: Schema, meta: str) -> dict[str, dict[str, Any]]:
    return {name: entity for name, entity in schema.items() if entity["meta-type"] == meta}


def test_common_commands_match(schemas: tuple[Schema, Schema]) -> None:
    ours, theirs = schemas
    common = sorted(set(entities_of(ours, "command")) & set(entities_of(theirs, "command")))
    assert len(common) >= 8, common
    comparer = Comparer(ours, theirs)
    for name in common:
        mine, reference = ours[name], theirs[name]
        comparer.compare(mine["arg-type"], reference["arg-type"], f"{name}(arguments)")
        comparer.compare(mine["ret-type"], reference["ret-type"], f"{name}(returns)")
        if mine.get("allow-oob", False) != reference.get("allow-oob", False):
            comparer.problem(name, "allow-oob differs")
    assert comparer.problems == [], "\n".join(comparer.problems)


def test_common_events_match(schemas: tuple[Schema, Schema]) -> None:
    ours, theirs = schemas
    common = sorted(set(entities_of(ours, "event")) & set(entities_of(theirs, "event")))
    comparer = Comparer(ours, theirs)
    for name in common:
        comparer.compare(ours[name]["arg-type"], theirs[name]["arg-type"], f"{name}(data)")
    assert comparer.problems == [], "\n".join(comparer.problems)


def test_our_commands_are_known_to_qsd(schemas: tuple[Schema, Schema]) -> None:
    ours, theirs = schemas
    # query-iothreads is QEMU's (misc.json) but not built into qemu-storage-daemon 7.2; blockd
    # offers it because iothreads are objects it manages.
    # Commands named x-blockd-* are blockd's documented extensions (schema/blockd.json).
    allowed = {"query-iothreads"}
    extra = sorted(
        name for name in set(entities_of(ours, "command")) - set(entities_of(theirs, "command")) - allowed
        if not name.startswith("x-blockd-")
    )
    assert extra == [], f"commands qemu-storage-daemon 7.2 does not have: {extra}"


def test_schema_is_self_consistent(schemas: tuple[Schema, Schema]) -> None:
    ours, _ = schemas
    for name, entity in ours.items():
        for key in ("arg-type", "ret-type", "element-type"):
            if key in entity:
                assert entity[key] in ours, f"{name}.{key} -> {entity[key]} undefined"
        for member in entity.get("members", []):
            if "type" in member:
                assert member["type"] in ours, f"{name}.{member.get('name')} -> {member['type']} undefined"
