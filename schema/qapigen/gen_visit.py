"""Writes visit.h/visit.cc: from_json/to_json for every type of the schema.

from_json reproduces QEMU 7.2's input visitor: members are read in schema order
(base first, then the branch of a union), the first problem wins, and unknown
members are reported after all known ones were read.
"""

from __future__ import annotations

from .cpp import Layout, cpp_string, cpp_type
from .gen_types import HEADER
from .model import (AlternateType, ArrayType, BuiltinType, EnumType, ObjectType, Schema, Type,
                    c_enumerator, c_member)


def _read(t: Type, src: str, dst: str, path: str, boxed: bool, indent: str) -> list[str]:
    """Statements reading JSON `src` into lvalue `dst` (of t's C++ type) at path expression `path`."""
    if boxed:
        dst = f"(*{dst})"
    if isinstance(t, BuiltinType):
        k = t.kind
        if k == "str":
            call = f"detail::read_str({src}, {dst}, mode, {path})"
        elif k == "bool":
            call = f"detail::read_bool({src}, {dst}, mode, {path})"
        elif k in ("int", "uint"):
            call = f"detail::read_integer<{t.cpp}>({src}, {dst}, mode, {path}, {cpp_string(t.cpp)})"
        elif k == "size":
            call = f"detail::read_size({src}, {dst}, mode, {path})"
        elif k == "number":
            call = f"detail::read_number({src}, {dst}, mode, {path})"
        elif k == "null":
            call = f"detail::read_null({src}, {dst}, mode, {path})"
        else:  # any
            return [f"{indent}{dst} = {src};"]
        return [f"{indent}BLOCKD_RETURN_IF_ERROR({call});"]
    if isinstance(t, ArrayType):
        elem = cpp_type(t.element)
        return [
            f"{indent}BLOCKD_RETURN_IF_ERROR(detail::check_array({src}, {path}));",
            f"{indent}{dst}.clear();",
            f"{indent}for (size_t i = 0; i < {src}.size(); ++i) {{",
            f"{indent}  const std::string elem_path = detail::element_path({path}, i, mode);",
            f"{indent}  {elem}& elem = {dst}.emplace_back();",
            *_read(t.element, f"{src}[i]", "elem", "elem_path", False, indent + "  "),
            f"{indent}}}",
        ]
    return [f"{indent}BLOCKD_RETURN_IF_ERROR(from_json({src}, {dst}, mode, {path}));"]


def _write(t: Type, src: str, boxed: bool) -> str:
    """An expression converting C++ value `src` of schema type t to nlohmann::json."""
    if boxed:
        src = f"*{src}"
    if isinstance(t, BuiltinType):
        if t.kind == "any":
            return src
        if t.kind == "null":
            return "nlohmann::json(nullptr)"
        return f"nlohmann::json({src})"
    if isinstance(t, ArrayType):
        return f"write_list({src})"
    return f"to_json({src})"


def _keys_name(t: ObjectType) -> str:
    return f"k{t.name}Keys"


def gen_visit(schema: Schema, layout: Layout) -> tuple[str, str]:
    types = [t for t in schema.user_types() if isinstance(t, (EnumType, ObjectType, AlternateType))]
    h = [HEADER, "// JSON conversion for every type of the schema.", "#pragma once", "",
         "#include <string_view>", "", "#include <nlohmann/json.hpp>", "",
         '#include "qapi/runtime.h"', '#include "qapi/types.h"', '#include "runtime/status.h"', "",
         "namespace blockd::qapi {", "",
         "// from_json(in, out, mode, path): fills `out` from `in`, checking it against the schema",
         "// as QEMU does and failing with QEMU's GenericError message. `path` is the name of `in`",
         "// in error messages (\"\" at the top level). On failure `out` is partly filled.",
         "// to_json(value): the JSON form of `value`; absent optional members are left out.", ""]
    for t in types:
        h.append(f"Status from_json(const nlohmann::json& in, {t.name}& out, InputMode mode, "
                 f"std::string_view path);")
        h.append(f"nlohmann::json to_json(const {t.name}& value);")
    h += ["", "}  // namespace blockd::qapi"]

    cc = [HEADER, '#include "qapi/visit.h"', "", "#include <span>", "#include <string>", "",
          "namespace blockd::qapi {", "namespace {", "",
          "template <typename T>",
          "nlohmann::json write_list(const std::vector<T>& list);", ""]
    objects = [t for t in types if isinstance(t, ObjectType)]
    # Member name tables, for the unexpected-member check.
    for t in objects:
        names = ", ".join(cpp_string(m.name) for m in t.members)
        if t.members:
            cc.append(f"constexpr std::string_view {_keys_name(t)}[] = {{{names}}};")
        else:
            cc.append(f"constexpr std::span<const std::string_view> {_keys_name(t)};")
    cc.append("")
    for t in objects:
        cc.append(f"Status read_members(const nlohmann::json& in, {t.name}& out, InputMode mode, "
                  f"std::string_view path);")
        cc.append(f"void write_members(const {t.name}& value, nlohmann::json& out);")
    cc.append("")
    for t in objects:
        cc += _object_members(t, layout)
    cc += ["template <typename T>",
           "nlohmann::json write_list(const std::vector<T>& list) {",
           "  nlohmann::json out = nlohmann::json::array();",
           "  for (const T& elem : list) {",
           "    if constexpr (std::is_same_v<T, std::string> || std::is_arithmetic_v<T> ||",
           "                  std::is_same_v<T, nlohmann::json> || std::is_same_v<T, std::nullptr_t>) {",
           "      out.push_back(nlohmann::json(elem));",
           "    } else {",
           "      out.push_back(to_json(elem));",
           "    }",
           "  }",
           "  return out;",
           "}", "", "}  // namespace", ""]
    for t in types:
        if isinstance(t, EnumType):
            cc += _enum(t)
        elif isinstance(t, ObjectType):
            cc += _object(t)
        else:
            cc += _alternate(t, layout)
    cc.append("}  // namespace blockd::qapi")
    return "\n".join(h) + "\n", "\n".join(cc) + "\n"


def _enum(t: EnumType) -> list[str]:
    return [
        f"Status from_json(const nlohmann::json& in, {t.name}& out, InputMode mode, std::string_view path) {{",
        "  std::string text;",
        "  BLOCKD_RETURN_IF_ERROR(detail::read_str(in, text, mode, path));",
        "  if (!parse_enum(text, out)) return detail::bad_enum_value(path, text);",
        "  return Status::ok();",
        "}",
        f"nlohmann::json to_json(const {t.name}& value) {{ return std::string(to_string(value)); }}",
        ""]


def _object_members(t: ObjectType, layout: Layout) -> list[str]:
    out = [f"Status read_members(const nlohmann::json& in, {t.name}& out, InputMode mode, "
           f"std::string_view path) {{"]
    if not t.members and not t.variants:
        out += ["  (void)in;", "  (void)out;", "  (void)mode;", "  (void)path;"]
    for m in t.members:
        field = f"out.{c_member(m.name)}"
        boxed = layout.is_boxed(t, m.name)
        out.append(f"  if (auto it = in.find({cpp_string(m.name)}); it != in.end()) {{")
        out.append(f"    const std::string member = detail::member_path(path, {cpp_string(m.name)});")
        if m.optional:
            out.append(f"    {field}.emplace();")
            out += _read(m.type, "(*it)", f"(*{field})", "member", boxed, "    ")
        else:
            out += _read(m.type, "(*it)", field, "member", boxed, "    ")
        if m.optional:
            out.append("  }")
        else:
            out.append("  } else {")
            out.append(f"    return detail::missing(detail::member_path(path, {cpp_string(m.name)}));")
            out.append("  }")
    if t.is_union:
        tag = f"out.{c_member(t.tag.name)}"
        out.append(f"  switch ({tag}) {{")
        for v in t.variants:
            enum = f"{t.tag.type.name}::{c_enumerator(v.case)}"
            field = f"out.u.{c_member(v.case)}"
            boxed = layout.is_boxed(t, "u." + v.case)
            target = f"**{field}" if boxed else f"*{field}"
            out.append(f"    case {enum}:")
            out.append(f"      {field}.emplace();")
            out.append(f"      return read_members(in, {target}, mode, path);")
        out.append("    default:")
        out.append("      break;")
        out.append("  }")
    out.append("  return Status::ok();")
    out.append("}")
    out.append(f"void write_members(const {t.name}& value, nlohmann::json& out) {{")
    if not t.members:
        out += ["  (void)value;", "  (void)out;"]
    for m in t.members:
        field = f"value.{c_member(m.name)}"
        boxed = layout.is_boxed(t, m.name)
        if m.optional:
            out.append(f"  if ({field}) out[{cpp_string(m.name)}] = {_write(m.type, '*' + field, boxed)};")
        else:
            out.append(f"  out[{cpp_string(m.name)}] = {_write(m.type, field, boxed)};")
    if t.is_union:
        for v in t.variants:
            field = f"value.u.{c_member(v.case)}"
            boxed = layout.is_boxed(t, "u." + v.case)
            target = f"**{field}" if boxed else f"*{field}"
            enum = f"{t.tag.type.name}::{c_enumerator(v.case)}"
            out.append(f"  if (value.{c_member(t.tag.name)} == {enum} && {field}) "
                       f"write_members({target}, out);")
    out.append("}")
    out.append("")
    return out


def _object(t: ObjectType) -> list[str]:
    out = [f"Status from_json(const nlohmann::json& in, {t.name}& out, InputMode mode, std::string_view path) {{",
           "  BLOCKD_RETURN_IF_ERROR(detail::check_object(in, path));",
           f"  out = {t.name}{{}};",
           "  BLOCKD_RETURN_IF_ERROR(read_members(in, out, mode, path));"]
    if t.is_union:
        out.append("  std::span<const std::string_view> branch_keys;")
        out.append(f"  switch (out.{c_member(t.tag.name)}) {{")
        for v in t.variants:
            out.append(f"    case {t.tag.type.name}::{c_enumerator(v.case)}:")
            out.append(f"      branch_keys = {_keys_name(v.type)};")
            out.append("      break;")
        out.append("    default:")
        out.append("      break;")
        out.append("  }")
        out.append(f"  return detail::check_unexpected(in, path, {_keys_name(t)}, branch_keys);")
    else:
        out.append(f"  return detail::check_unexpected(in, path, {_keys_name(t)});")
    out += ["}",
            f"nlohmann::json to_json(const {t.name}& value) {{",
            "  nlohmann::json out = nlohmann::json::object();",
            "  write_members(value, out);",
            "  return out;",
            "}", ""]
    return out


def _alternate(t: AlternateType, layout: Layout) -> list[str]:
    checks = {"object": "in.is_object()", "string": "in.is_string()",
              "number": "in.is_number()", "boolean": "in.is_boolean()", "null": "in.is_null()"}
    out = [f"Status from_json(const nlohmann::json& in, {t.name}& out, InputMode mode, std::string_view path) {{",
           f"  {t.name}::Base& base = out;"]
    string_branch = next((i for i, b in enumerate(t.branches) if b.type.json_kind() == "string"), None)
    for i, b in enumerate(t.branches):
        kind = b.type.json_kind()
        cond = checks[kind]
        if kind in ("number", "boolean", "null"):
            cond = f"mode == InputMode::kQmp && {cond}"
        out.append(f"  if ({cond}) {{")
        out.append(f"    auto& value = base.emplace<{i}>();")
        out += _read(b.type, "in", "value", "path", layout.is_boxed(t, b.name), "    ")
        out.append("    return Status::ok();")
        out.append("  }")
    if string_branch is None:
        # Keyval delivers every scalar as a string: feed it to the scalar branch.
        scalar = next((i for i, b in enumerate(t.branches)
                       if b.type.json_kind() in ("number", "boolean")), None)
        if scalar is not None:
            b = t.branches[scalar]
            out.append("  if (mode == InputMode::kKeyval && in.is_string()) {")
            out.append(f"    auto& value = base.emplace<{scalar}>();")
            out += _read(b.type, "in", "value", "path", layout.is_boxed(t, b.name), "    ")
            out.append("    return Status::ok();")
            out.append("  }")
    out.append(f"  return detail::invalid_type(detail::short_name(path), {cpp_string(t.name)});")
    out.append("}")
    out.append(f"nlohmann::json to_json(const {t.name}& value) {{")
    out.append(f"  const {t.name}::Base& base = value;")
    out.append("  switch (base.index()) {")
    for i, b in enumerate(t.branches):
        out.append(f"    case {i}:")
        out.append(f"      return {_write(b.type, f'std::get<{i}>(base)', layout.is_boxed(t, b.name))};")
    out.append("    default:")
    out.append("      return nullptr;")
    out.append("  }")
    out.append("}")
    out.append("")
    return out
