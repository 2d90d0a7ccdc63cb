"""Builds the query-qmp-schema answer and writes introspect.h/introspect.cc.

The list follows QEMU 7.2: the implemented commands and all events in schema
order, then every type they reach in order of first use.  Type names other than
built-ins are replaced by numbers in order of first use; all integer types show
as 'int'; a union lists a variant for every tag value (the empty object for
values without a branch).
"""

from __future__ import annotations

import json

from .gen_types import HEADER
from .model import (AlternateType, ArrayType, BuiltinType, Command, EnumType, ObjectType, Schema,
                    Type)


class _Introspector:
    def __init__(self, schema: Schema):
        self.schema = schema
        self.entries: list[dict] = []
        self.used: list[Type] = []
        self.used_ids: set[int] = set()
        self.names: dict[int, str] = {}
        self.int_type = schema.types["int"]
        self.int_list = ArrayType(self.int_type)

    def name(self, t: Type) -> str:
        key = id(t)
        if key not in self.names:
            self.names[key] = str(len(self.names))
        return self.names[key]

    def use(self, t: Type) -> str:
        if isinstance(t, BuiltinType) and t.json_type == "int":
            t = self.int_type
        elif isinstance(t, ArrayType) and isinstance(t.element, BuiltinType) \
                and t.element.json_type == "int":
            t = self.int_list
        if id(t) not in self.used_ids:
            self.used_ids.add(id(t))
            self.used.append(t)
        if isinstance(t, BuiltinType):
            return t.name
        if isinstance(t, ArrayType):
            return "[" + self.use(t.element) + "]"
        return self.name(t)

    @staticmethod
    def with_features(obj: dict, features: list[str]) -> dict:
        if features:
            obj["features"] = list(features)
        return obj

    def run(self) -> list[dict]:
        empty = self.schema.empty_object
        implemented = set(self.schema.implemented)
        defs = [c for c in self.schema.commands if c.name in implemented] + self.schema.events
        for d in sorted(defs, key=lambda d: d.seq):  # interleaved, as written in the schema
            if isinstance(d, Command):
                obj = {"name": d.name, "meta-type": "command",
                       "arg-type": self.use(d.arg_type or empty),
                       "ret-type": self.use(d.ret_type or empty)}
                if d.allow_oob:
                    obj["allow-oob"] = True
            else:
                obj = {"name": d.name, "meta-type": "event",
                       "arg-type": self.use(d.arg_type or empty)}
            self.entries.append(self.with_features(obj, d.features))
        i = 0
        while i < len(self.used):
            self.entries.append(self.describe(self.used[i]))
            i += 1
        return self.entries

    def describe(self, t: Type) -> dict:
        if isinstance(t, BuiltinType):
            return {"name": t.name, "meta-type": "builtin", "json-type": t.json_type}
        if isinstance(t, ArrayType):
            elem = self.use(t.element)
            return {"name": "[" + elem + "]", "meta-type": "array", "element-type": elem}
        if isinstance(t, EnumType):
            obj = {"name": self.name(t), "meta-type": "enum",
                   "members": [self.with_features({"name": v.name}, v.features) for v in t.values],
                   "values": [v.name for v in t.values]}
            return self.with_features(obj, t.features)
        if isinstance(t, AlternateType):
            obj = {"name": self.name(t), "meta-type": "alternate",
                   "members": [{"type": self.use(b.type)} for b in t.branches]}
            return self.with_features(obj, t.features)
        assert isinstance(t, ObjectType)
        members = []
        for m in t.members:
            mobj = {"name": m.name, "type": self.use(m.type)}
            if m.optional:
                mobj["default"] = None
            members.append(self.with_features(mobj, m.features))
        obj = {"name": self.name(t), "meta-type": "object", "members": members}
        if t.is_union:
            obj["tag"] = t.tag.name
            obj["variants"] = [{"case": v.case, "type": self.use(v.type)}
                               for v in t.all_variants(self.schema.empty_object)]
        return self.with_features(obj, t.features)


def introspection(schema: Schema) -> list[dict]:
    """The SchemaInfo list query-qmp-schema returns, as Python data."""
    return _Introspector(schema).run()


def gen_introspect(schema: Schema) -> tuple[str, str]:
    data = json.dumps(introspection(schema), separators=(",", ":"))
    h = [HEADER, "// The schema description returned by query-qmp-schema.", "#pragma once", "",
         "#include <nlohmann/json.hpp>", "", "namespace blockd::qapi {", "",
         "// The SchemaInfo list for query-qmp-schema, as QEMU 7.2 shapes it: implemented",
         "// commands, all events and the types they reach, with masked type names. Built on",
         "// first use; thread-safe; lives until exit.",
         "const nlohmann::json& qmp_schema_introspection();", "", "}  // namespace blockd::qapi"]
    # Raw string chunks stay well below compiler limits on literal length.
    chunks = [data[i:i + 4000] for i in range(0, len(data), 4000)] or [""]
    cc = [HEADER, '#include "qapi/introspect.h"', "", "namespace blockd::qapi {", "",
          "namespace {", "constexpr const char* kSchemaChunks[] = {"]
    for c in chunks:
        assert ')qapi"' not in c
        cc.append(f'    R"qapi({c})qapi",')
    cc += ["};", "}  // namespace", "",
           "const nlohmann::json& qmp_schema_introspection() {",
           "  static const nlohmann::json schema = [] {",
           "    std::string text;",
           "    for (const char* chunk : kSchemaChunks) text += chunk;",
           "    return nlohmann::json::parse(text);",
           "  }();",
           "  return schema;",
           "}", "", "}  // namespace blockd::qapi"]
    return "\n".join(h) + "\n", "\n".join(cc) + "\n"
