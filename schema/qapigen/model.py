"""The checked schema model: types, commands and events with resolved references.

build_schema() turns parsed expressions into a Schema, reporting the first
semantic problem (unknown type, duplicate member, bad discriminator, ...) as a
SchemaError that names the file and line of the offending definition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import SchemaError, SourceInfo
from .parser import Expression

# Built-in types: name -> (JSON type for introspection, C++ type, kind).
BUILTINS = {
    "str": ("string", "std::string", "str"),
    "number": ("number", "double", "number"),
    "int": ("int", "int64_t", "int"),
    "int8": ("int", "int8_t", "int"),
    "int16": ("int", "int16_t", "int"),
    "int32": ("int", "int32_t", "int"),
    "int64": ("int", "int64_t", "int"),
    "uint8": ("int", "uint8_t", "uint"),
    "uint16": ("int", "uint16_t", "uint"),
    "uint32": ("int", "uint32_t", "uint"),
    "uint64": ("int", "uint64_t", "uint"),
    "size": ("int", "uint64_t", "size"),
    "bool": ("boolean", "bool", "bool"),
    "null": ("null", "std::nullptr_t", "null"),
    "any": ("value", "nlohmann::json", "any"),
}

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_VALUE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_EVENT_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")


class Type:
    """Base of all schema types."""

    def json_kind(self) -> str:
        """The JSON value kind an alternate uses to pick this branch."""
        raise NotImplementedError


@dataclass(eq=False)
class BuiltinType(Type):
    name: str
    json_type: str
    cpp: str
    kind: str  # str, number, int, uint, size, bool, null, any
    info: SourceInfo | None = None

    def json_kind(self) -> str:
        return {"str": "string", "number": "number", "int": "number", "uint": "number",
                "size": "number", "bool": "boolean", "null": "null", "any": "any"}[self.kind]


@dataclass(eq=False)
class EnumValue:
    name: str
    features: list[str]


@dataclass(eq=False)
class EnumType(Type):
    name: str
    info: SourceInfo
    values: list[EnumValue]
    features: list[str] = field(default_factory=list)

    def json_kind(self) -> str:
        return "string"

    def value_names(self) -> list[str]:
        return [v.name for v in self.values]


@dataclass(eq=False)
class ArrayType(Type):
    element: Type
    info: SourceInfo | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.element.name + "List"

    def json_kind(self) -> str:
        return "array"


@dataclass(eq=False)
class Member:
    name: str
    type: Type
    optional: bool
    features: list[str]
    info: SourceInfo


@dataclass(eq=False)
class Variant:
    case: str
    type: ObjectType  # the empty object for enum values without a branch


@dataclass(eq=False)
class ObjectType(Type):
    """A struct or a flat union (variants set), with base members flattened in."""

    name: str
    info: SourceInfo | None
    members: list[Member]  # all members: base first, then local
    base: ObjectType | None = None
    tag: Member | None = None  # unions only
    variants: list[Variant] = field(default_factory=list)  # unions only, explicit branches
    features: list[str] = field(default_factory=list)
    implicit: bool = False  # an argument/event struct made from inline 'data'

    def json_kind(self) -> str:
        return "object"

    @property
    def is_union(self) -> bool:
        return self.tag is not None

    def all_variants(self, empty: ObjectType) -> list[Variant]:
        """Explicit branches, then the empty object for remaining tag values (as QEMU lists them)."""
        assert self.tag is not None and isinstance(self.tag.type, EnumType)
        have = {v.case for v in self.variants}
        extra = [Variant(v, empty) for v in self.tag.type.value_names() if v not in have]
        return self.variants + extra


@dataclass(eq=False)
class AlternateBranch:
    name: str
    type: Type


@dataclass(eq=False)
class AlternateType(Type):
    name: str
    info: SourceInfo
    branches: list[AlternateBranch]
    features: list[str] = field(default_factory=list)

    def json_kind(self) -> str:
        return "alternate"


@dataclass(eq=False)
class Command:
    name: str
    info: SourceInfo
    arg_type: ObjectType | None
    boxed: bool
    ret_type: Type | None
    features: list[str]
    allow_oob: bool
    allow_preconfig: bool
    gen: bool
    seq: int = 0  # position among all commands and events of the schema


@dataclass(eq=False)
class Event:
    name: str
    info: SourceInfo
    arg_type: ObjectType | None
    boxed: bool
    features: list[str]
    seq: int = 0  # position among all commands and events of the schema


@dataclass
class Schema:
    types: dict[str, Type]  # named types (built-ins included), in definition order
    commands: list[Command]
    events: list[Event]
    empty_object: ObjectType
    arrays: dict[str, ArrayType]
    implemented: list[str] = field(default_factory=list)

    def user_types(self) -> list[Type]:
        """Enum, object and alternate types, in definition order (implicit ones included)."""
        return [t for t in self.types.values() if not isinstance(t, BuiltinType)]

    def implemented_commands(self) -> list[Command]:
        wanted = set(self.implemented)
        return [c for c in self.commands if c.name in wanted]


_ALLOWED_KEYS = {
    "enum": ({"data"}, {"features"}),
    "struct": ({"data"}, {"base", "features"}),
    "union": ({"base", "discriminator", "data"}, {"features"}),
    "alternate": ({"data"}, {"features"}),
    "command": (set(), {"data", "returns", "boxed", "features", "allow-oob",
                        "allow-preconfig", "gen"}),
    "event": (set(), {"data", "boxed", "features"}),
}


def camel(name: str) -> str:
    """'block-export-del' -> 'BlockExportDel', 'BLOCK_EXPORT_DELETED' -> 'BlockExportDeleted'."""
    return "".join(p[:1].upper() + p[1:].lower() for p in re.split(r"[-_.]", name) if p)


class _Builder:
    def __init__(self, exprs: list[Expression]):
        self.exprs = exprs
        self.types: dict[str, Type] = {}
        self.defined_at: dict[str, SourceInfo | None] = {}
        self.arrays: dict[str, ArrayType] = {}
        self.commands: list[Command] = []
        self.events: list[Event] = []
        for name, (json_type, cpp, kind) in BUILTINS.items():
            self.types[name] = BuiltinType(name, json_type, cpp, kind)
            self.defined_at[name] = None
        self.empty = ObjectType("q_empty", None, [], implicit=True)

    # ---- helpers -------------------------------------------------------
    def define(self, name: str, info: SourceInfo, what: str) -> None:
        if name in self.defined_at:
            where = self.defined_at[name]
            if where is None:
                raise SchemaError(info, f"{what} '{name}' redefines a built-in type")
            raise SchemaError(info, f"{what} '{name}' is already defined at {where}")
        self.defined_at[name] = info

    @staticmethod
    def check_name(name, info: SourceInfo, what: str, regex=_NAME_RE) -> str:
        if not isinstance(name, str) or not regex.match(name):
            raise SchemaError(info, f"{what} has an invalid name {name!r}")
        return name

    @staticmethod
    def features(raw, info: SourceInfo, where: str) -> list[str]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise SchemaError(info, f"'features' of {where} must be a list")
        out = []
        for f in raw:
            if isinstance(f, dict):
                if set(f) != {"name"}:
                    raise SchemaError(info, f"feature of {where} must be a string or {{'name': ...}}")
                f = f["name"]
            _Builder.check_name(f, info, f"feature of {where}")
            if f in out:
                raise SchemaError(info, f"{where} lists feature '{f}' twice")
            out.append(f)
        return out

    def resolve(self, ref, info: SourceInfo, where: str, allow_list=True) -> Type:
        if isinstance(ref, list):
            if not allow_list:
                raise SchemaError(info, f"{where} cannot be a list")
            if len(ref) != 1 or not isinstance(ref[0], str):
                raise SchemaError(info, f"{where}: a list type must name exactly one element type")
            elem = self.resolve(ref[0], info, where, allow_list=False)
            arr = self.arrays.get(elem.name)
            if arr is None:
                arr = self.arrays[elem.name] = ArrayType(elem)
            return arr
        if not isinstance(ref, str):
            raise SchemaError(info, f"{where} must name a type")
        t = self.types.get(ref)
        if t is None:
            raise SchemaError(info, f"{where} uses unknown type '{ref}'")
        return t

    def members(self, data, info: SourceInfo, owner: str) -> list[tuple]:
        """Checks an inline member dict; returns (name, type ref, optional, features)."""
        if not isinstance(data, dict):
            raise SchemaError(info, f"'data' of {owner} must be an object")
        out = []
        seen = {}
        for key, spec in data.items():
            optional = key.startswith("*")
            name = key[1:] if optional else key
            self.check_name(name, info, f"member of {owner}")
            feats: list[str] = []
            if isinstance(spec, dict):
                extra = set(spec) - {"type", "features"}
                if "type" not in spec or extra:
                    raise SchemaError(info, f"member '{name}' of {owner} must be a type name, "
                                            f"a list, or {{'type': ..., 'features': [...]}}")
                feats = self.features(spec.get("features"), info, f"member '{name}' of {owner}")
                spec = spec["type"]
            cname = c_member(name)
            if cname in seen:
                raise SchemaError(info, f"{owner} has members '{seen[cname]}' and '{name}' "
                                        f"that collide" if seen[cname] != name
                                  else f"{owner} has member '{name}' twice")
            seen[cname] = name
            out.append((name, spec, optional, feats))
        return out

    def check_keys(self, expr: dict, meta: str, info: SourceInfo, name: str) -> None:
        required, optional = _ALLOWED_KEYS[meta]
        for key in expr:
            if key != meta and key not in required and key not in optional:
                raise SchemaError(info, f"{meta} '{name}' has unknown key '{key}'")
        for key in sorted(required):
            if key not in expr:
                raise SchemaError(info, f"{meta} '{name}' lacks '{key}'")
        for key in ("boxed", "allow-oob", "allow-preconfig", "gen"):
            if key in expr and not isinstance(expr[key], bool):
                raise SchemaError(info, f"'{key}' of {meta} '{name}' must be true or false")

    # ---- passes ----------------------------------------------------------
    def build(self) -> Schema:
        # Pass 1: declare every named type so references can point forward.
        pending = []
        for e in self.exprs:
            expr, info = e.expr, e.info
            metas = [k for k in _ALLOWED_KEYS if k in expr]
            if "pragma" in expr:
                continue
            if len(metas) != 1:
                raise SchemaError(info, "expression must have exactly one of 'enum', 'struct', "
                                        "'union', 'alternate', 'command', 'event'")
            meta = metas[0]
            name = expr[meta]
            if meta == "event":
                self.check_name(name, info, "event", _EVENT_RE)
            else:
                self.check_name(name, info, meta)
            self.check_keys(expr, meta, info, name)
            self.check_doc(e, meta, name)
            self.define(name, info, meta)
            if meta == "enum":
                self.types[name] = self.enum(expr, info, name)
            elif meta in ("struct", "union"):
                self.types[name] = ObjectType(name, info, [])
            elif meta == "alternate":
                self.types[name] = AlternateType(name, info, [])
            pending.append((meta, name, expr, info))
        # Implicit argument/event types get names that may not clash with real ones.
        # Pass 2: fill in structs in an order where bases come first.
        done: set[str] = set()
        by_name = {n: (m, ex, i) for m, n, ex, i in pending if m in ("struct", "union")}
        for meta, name, expr, info in pending:
            if meta in ("struct", "union"):
                self.object(name, by_name, done, [])
        for meta, name, expr, info in pending:
            if meta == "alternate":
                self.alternate(self.types[name], expr, info)
            elif meta == "command":
                self.command(expr, info, name)
            elif meta == "event":
                self.event(expr, info, name)
        return Schema(self.types, self.commands, self.events, self.empty, self.arrays)

    def check_doc(self, e: Expression, meta: str, name: str) -> None:
        if e.doc is None:
            raise SchemaError(e.info, f"{meta} '{name}' has no documentation block ('##' / '# @{name}:')")
        if e.doc.symbol != name:
            raise SchemaError(e.doc.info, f"documentation block for '{e.doc.symbol}' "
                                          f"precedes the definition of '{name}'")
        known = set(self.documentable_names(e.expr, meta))
        for member, info in e.doc.member_names:
            if member not in known:
                raise SchemaError(info, f"documentation of '{name}' describes '{member}', "
                                        f"which {meta} '{name}' does not have")

    @staticmethod
    def documentable_names(expr: dict, meta: str):
        def keys(d):
            if isinstance(d, dict):
                for k, v in d.items():
                    yield k.lstrip("*")
                    if isinstance(v, dict):
                        yield from (f if isinstance(f, str) else f.get("name")
                                    for f in v.get("features", []) or [])
        data = expr.get("data")
        if meta == "enum" and isinstance(data, list):
            for v in data:
                yield v if isinstance(v, str) else (v.get("name") if isinstance(v, dict) else None)
        else:
            yield from keys(data)
        yield from keys(expr.get("base"))
        for f in expr.get("features", []) or []:
            yield f if isinstance(f, str) else (f.get("name") if isinstance(f, dict) else None)

    def enum(self, expr: dict, info: SourceInfo, name: str) -> EnumType:
        data = expr["data"]
        if not isinstance(data, list) or not data:
            raise SchemaError(info, f"'data' of enum '{name}' must be a non-empty list")
        values: list[EnumValue] = []
        seen: dict[str, str] = {}
        for v in data:
            feats: list[str] = []
            if isinstance(v, dict):
                if "name" not in v or set(v) - {"name", "features"}:
                    raise SchemaError(info, f"value of enum '{name}' must be a string or "
                                            f"{{'name': ..., 'features': [...]}}")
                feats = self.features(v.get("features"), info, f"value of enum '{name}'")
                v = v["name"]
            self.check_name(v, info, f"value of enum '{name}'", _VALUE_RE)
            cname = c_enumerator(v)
            if cname in seen:
                raise SchemaError(info, f"enum '{name}' has values '{seen[cname]}' and '{v}' "
                                        f"that collide" if seen[cname] != v
                                  else f"enum '{name}' has value '{v}' twice")
            seen[cname] = v
            values.append(EnumValue(v, feats))
        return EnumType(name, info, values, self.features(expr.get("features"), info, f"enum '{name}'"))

    def make_members(self, raw: list[tuple], info: SourceInfo, owner: str) -> list[Member]:
        return [Member(n, self.resolve(t, info, f"member '{n}' of {owner}"), opt, feats, info)
                for n, t, opt, feats in raw]

    def object(self, name: str, by_name: dict, done: set[str], stack: list[str]) -> ObjectType:
        obj = self.types[name]
        assert isinstance(obj, ObjectType)
        if name in done:
            return obj
        meta, expr, info = by_name[name]
        if name in stack:
            raise SchemaError(info, f"{meta} '{name}' is its own base")
        owner = f"{meta} '{name}'"
        base_members: list[Member] = []
        base = None
        raw_base = expr.get("base")
        if isinstance(raw_base, dict) and meta == "union":
            base_members = self.make_members(self.members(raw_base, info, f"base of {owner}"),
                                             info, owner)
        elif raw_base is not None:
            if not isinstance(raw_base, str):
                raise SchemaError(info, f"'base' of {owner} must name a struct"
                                  + (" or be an object" if meta == "union" else ""))
            bt = self.types.get(raw_base)
            if bt is None:
                raise SchemaError(info, f"{owner} has unknown base '{raw_base}'")
            if not (isinstance(bt, ObjectType) and by_name.get(raw_base, ("",))[0] == "struct"):
                raise SchemaError(info, f"base '{raw_base}' of {owner} is not a struct")
            base = self.object(raw_base, by_name, done, stack + [name])
            base_members = list(base.members)
        obj.base = base
        obj.features = self.features(expr.get("features"), info, owner)
        if meta == "struct":
            local = self.make_members(self.members(expr["data"], info, owner), info, owner)
            self.check_clash(base_members, local, info, owner, "base")
            obj.members = base_members + local
        else:
            obj.members = base_members
            self.union(obj, expr, info, owner, by_name, done, stack + [name])
        done.add(name)
        return obj

    @staticmethod
    def check_clash(first: list[Member], second: list[Member], info: SourceInfo, owner: str,
                    first_what: str) -> None:
        seen = {c_member(m.name): m.name for m in first}
        for m in second:
            if c_member(m.name) in seen:
                raise SchemaError(info, f"member '{m.name}' of {owner} collides with "
                                        f"{first_what} member '{seen[c_member(m.name)]}'")

    def union(self, obj: ObjectType, expr: dict, info: SourceInfo, owner: str,
              by_name: dict, done: set[str], stack: list[str]) -> None:
        disc = expr["discriminator"]
        if not isinstance(disc, str):
            raise SchemaError(info, f"'discriminator' of {owner} must be a member name")
        tag = next((m for m in obj.members if m.name == disc), None)
        if tag is None:
            raise SchemaError(info, f"discriminator '{disc}' of {owner} is not a member of its base")
        if tag.optional:
            raise SchemaError(info, f"discriminator '{disc}' of {owner} must not be optional")
        if not isinstance(tag.type, EnumType):
            raise SchemaError(info, f"discriminator '{disc}' of {owner} must be of an enum type")
        obj.tag = tag
        data = expr["data"]
        if not isinstance(data, dict):
            raise SchemaError(info, f"'data' of {owner} must be an object")
        values = tag.type.value_names()
        for case, ref in data.items():
            if case not in values:
                raise SchemaError(info, f"branch '{case}' of {owner} is not a value of "
                                        f"enum '{tag.type.name}'")
            if not isinstance(ref, str):
                raise SchemaError(info, f"branch '{case}' of {owner} must name a struct")
            bt = self.types.get(ref)
            if bt is None:
                raise SchemaError(info, f"branch '{case}' of {owner} uses unknown type '{ref}'")
            if not (isinstance(bt, ObjectType) and by_name.get(ref, ("",))[0] == "struct"):
                raise SchemaError(info, f"branch '{case}' of {owner} must be a struct, "
                                        f"'{ref}' is not")
            branch = self.object(ref, by_name, done, stack)
            self.check_clash(obj.members, branch.members, info, owner, "base")
            obj.variants.append(Variant(case, branch))

    def alternate(self, alt: AlternateType, expr: dict, info: SourceInfo) -> None:
        owner = f"alternate '{alt.name}'"
        data = expr["data"]
        if not isinstance(data, dict) or not data:
            raise SchemaError(info, f"'data' of {owner} must be a non-empty object")
        kinds: dict[str, str] = {}
        alt.features = self.features(expr.get("features"), info, owner)
        for bname, ref in data.items():
            self.check_name(bname, info, f"branch of {owner}")
            if bname.startswith("*"):
                raise SchemaError(info, f"branch '{bname[1:]}' of {owner} cannot be optional")
            t = self.resolve(ref, info, f"branch '{bname}' of {owner}", allow_list=False)
            kind = t.json_kind()
            if kind in ("alternate", "any"):
                raise SchemaError(info, f"branch '{bname}' of {owner} cannot be of type '{t.name}'")
            if kind in kinds:
                raise SchemaError(info, f"branches '{kinds[kind]}' and '{bname}' of {owner} "
                                        f"both take a JSON {kind}")
            kinds[kind] = bname
            alt.branches.append(AlternateBranch(bname, t))

    def implicit_object(self, name: str, data, info: SourceInfo, owner: str) -> ObjectType:
        members = self.make_members(self.members(data, info, owner), info, owner)
        if name in self.types:
            raise SchemaError(info, f"{owner} needs the type name '{name}' for its arguments, "
                                    f"but it is already defined at {self.defined_at[name]}")
        obj = ObjectType(name, info, members, implicit=True)
        self.types[name] = obj
        self.defined_at[name] = info
        return obj

    def data_type(self, expr: dict, info: SourceInfo, owner: str, implicit_name: str):
        data = expr.get("data")
        boxed = expr.get("boxed", False)
        if data is None:
            if boxed:
                raise SchemaError(info, f"{owner} is 'boxed' but has no 'data'")
            return None, False
        if isinstance(data, dict):
            if boxed:
                raise SchemaError(info, f"{owner} is 'boxed', so its 'data' must name a type")
            return self.implicit_object(implicit_name, data, info, owner), False
        t = self.resolve(data, info, f"'data' of {owner}", allow_list=False)
        if not isinstance(t, ObjectType):
            raise SchemaError(info, f"'data' of {owner} must be a struct or union, '{t.name}' is not")
        if t.is_union and not boxed:
            raise SchemaError(info, f"{owner} takes union '{t.name}' and so must be 'boxed'")
        return t, boxed

    def command(self, expr: dict, info: SourceInfo, name: str) -> None:
        owner = f"command '{name}'"
        arg, boxed = self.data_type(expr, info, owner, camel(name) + "Args")
        ret = None
        if "returns" in expr:
            ret = self.resolve(expr["returns"], info, f"'returns' of {owner}")
            elem = ret.element if isinstance(ret, ArrayType) else ret
            if not (isinstance(elem, ObjectType) or (elem.name == "any" and elem is ret)
                    or isinstance(ret, ArrayType)):
                raise SchemaError(info, f"'returns' of {owner} must be a struct, a list or 'any'")
        self.commands.append(Command(
            name, info, arg, boxed, ret, self.features(expr.get("features"), info, owner),
            expr.get("allow-oob", False), expr.get("allow-preconfig", False),
            expr.get("gen", True), len(self.commands) + len(self.events)))

    def event(self, expr: dict, info: SourceInfo, name: str) -> None:
        owner = f"event '{name}'"
        arg, boxed = self.data_type(expr, info, owner, camel(name) + "Event")
        self.events.append(Event(name, info, arg, boxed,
                                 self.features(expr.get("features"), info, owner),
                                 len(self.commands) + len(self.events)))


# ---- C++ naming -------------------------------------------------------------

CPP_RESERVED = {
    "alignas", "alignof", "and", "and_eq", "asm", "auto", "bitand", "bitor", "bool", "break",
    "case", "catch", "char", "char8_t", "char16_t", "char32_t", "class", "compl", "concept",
    "const", "consteval", "constexpr", "constinit", "const_cast", "continue", "co_await",
    "co_return", "co_yield", "decltype", "default", "delete", "do", "double", "dynamic_cast",
    "else", "enum", "explicit", "export", "extern", "false", "float", "for", "friend", "goto",
    "if", "inline", "int", "long", "mutable", "namespace", "new", "noexcept", "not", "not_eq",
    "nullptr", "operator", "or", "or_eq", "private", "protected", "public", "register",
    "reinterpret_cast", "requires", "return", "short", "signed", "sizeof", "static",
    "static_assert", "static_cast", "struct", "switch", "template", "this", "thread_local",
    "throw", "true", "try", "typedef", "typeid", "typename", "union", "unsigned", "using",
    "virtual", "void", "volatile", "wchar_t", "while", "xor", "xor_eq",
    # Names that system headers define as macros.
    "errno", "unix", "linux", "stdin", "stdout", "stderr",
}


def c_member(name: str) -> str:
    """C++ identifier of a member or union branch: dashes/dots become underscores."""
    ident = re.sub(r"[-.]", "_", name)
    return ident + "_" if ident in CPP_RESERVED else ident


def c_enumerator(value: str) -> str:
    """C++ enumerator of an enum value: 'foo-bar' -> 'kFooBar', '144' -> 'k144'."""
    return "k" + "".join(p[:1].upper() + p[1:] for p in re.split(r"[-_.]", value) if p)


def c_command(name: str) -> str:
    """'blockdev-add' -> 'blockdev_add'."""
    return re.sub(r"[-.]", "_", name)


def build_schema(exprs: list[Expression], implemented: list[str] | None = None,
                 implemented_info: SourceInfo | None = None) -> Schema:
    """Checks parsed expressions and returns the schema; raises SchemaError."""
    schema = _Builder(exprs).build()
    if implemented is not None:
        names = {c.name for c in schema.commands}
        seen = set()
        for cmd in implemented:
            if cmd not in names:
                raise SchemaError(implemented_info, f"implemented command '{cmd}' is not in the schema")
            if cmd in seen:
                raise SchemaError(implemented_info, f"command '{cmd}' is listed twice")
            seen.add(cmd)
        schema.implemented = list(implemented)
    return schema
