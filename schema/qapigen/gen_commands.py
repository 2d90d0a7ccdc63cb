"""Writes commands.h/commands.cc: handler declarations, marshalling and the command table."""

from __future__ import annotations

from .cpp import cpp_string, cpp_type
from .gen_types import HEADER
from .model import ArrayType, Command, Schema, c_command


def _ret_type(c: Command) -> str:
    if not c.gen:
        return "Expected<nlohmann::json>"
    if c.ret_type is None:
        return "Status"
    if c.ret_type.name == "any":
        return "Expected<nlohmann::json>"
    return f"Expected<{cpp_type(c.ret_type)}>"


def _handler_decl(c: Command) -> str:
    params = "qmp::Context& ctx"
    if c.arg_type is not None:
        params += f", const {c.arg_type.name}& args"
    return f"{_ret_type(c)} qmp_{c_command(c.name)}({params})"


def gen_commands(schema: Schema) -> tuple[str, str]:
    cmds = schema.implemented_commands()
    h = [HEADER, "// The implemented QMP commands: handler declarations and the dispatch table.",
         "#pragma once", "", "#include <span>", "#include <string_view>", "#include <vector>", "",
         "#include <nlohmann/json.hpp>", "", '#include "qapi/runtime.h"', '#include "qapi/types.h"',
         '#include "runtime/status.h"', "",
         "namespace blockd::qmp {", "class Context;", "}  // namespace blockd::qmp", "",
         "namespace blockd::qapi {", "",
         "// One dispatchable command. `marshal` checks `args` (null or an object) against the",
         "// schema, calls the hand-written handler and converts its result; a command without",
         "// 'returns' gives {}. Runs on the thread that runs the handler (the main loop).",
         "struct CommandEntry {",
         "  std::string_view name;",
         "  Expected<nlohmann::json> (*marshal)(qmp::Context& ctx, const nlohmann::json& args,",
         "                                      InputMode mode);",
         "  bool allow_oob;",
         "  bool allow_preconfig;",
         "  bool deprecated;",
         "};", "",
         "// The implemented commands, in schema order.",
         "std::span<const CommandEntry> command_table();", "",
         "// Hand-written handlers, one per implemented command (defined outside the generated code).",
         "// Commands with 'gen': false in the schema return their result as raw JSON.", ""]
    for c in cmds:
        h.append(f"// {c.name}")
        h.append(_handler_decl(c) + ";")
    h += ["", "}  // namespace blockd::qapi"]

    cc = [HEADER, '#include "qapi/commands.h"', "", '#include "qapi/visit.h"', "",
          "namespace blockd::qapi {", "namespace {", "",
          "const nlohmann::json& empty_object() {",
          "  static const nlohmann::json empty = nlohmann::json::object();",
          "  return empty;",
          "}", ""]
    for c in cmds:
        cname = c_command(c.name)
        cc.append(f"Expected<nlohmann::json> marshal_{cname}(qmp::Context& ctx, "
                  f"const nlohmann::json& raw_args, InputMode mode) {{")
        cc.append("  const nlohmann::json& in = raw_args.is_null() ? empty_object() : raw_args;")
        cc.append("  if (!in.is_object()) {")
        cc.append("    return Status::generic(\"QMP input member 'arguments' must be an object\");")
        cc.append("  }")
        if c.arg_type is not None:
            cc.append(f"  {c.arg_type.name} args;")
            cc.append("  BLOCKD_RETURN_IF_ERROR(from_json(in, args, mode, \"\"));")
            call = f"qmp_{cname}(ctx, args)"
        else:
            cc.append("  (void)mode;")
            cc.append("  BLOCKD_RETURN_IF_ERROR(detail::check_unexpected(in, \"\", {}));")
            call = f"qmp_{cname}(ctx)"
        rt = _ret_type(c)
        if rt == "Status":
            cc.append(f"  BLOCKD_RETURN_IF_ERROR({call});")
            cc.append("  return nlohmann::json::object();")
        else:
            cc.append(f"  {rt} result = {call};")
            cc.append("  if (!result) return std::move(result).status();")
            if rt == "Expected<nlohmann::json>":
                cc.append("  return std::move(result).value();")
            elif isinstance(c.ret_type, ArrayType):
                cc.append("  nlohmann::json out = nlohmann::json::array();")
                cc.append("  for (const auto& elem : *result) out.push_back(to_json(elem));")
                cc.append("  return out;")
            else:
                cc.append("  return to_json(*result);")
        cc.append("}")
        cc.append("")
    cc += ["}  // namespace", "",
           "std::span<const CommandEntry> command_table() {",
           "  static const CommandEntry table[] = {"]
    for c in cmds:
        b = lambda v: "true" if v else "false"  # noqa: E731
        cc.append(f"      {{{cpp_string(c.name)}, &marshal_{c_command(c.name)}, {b(c.allow_oob)}, "
                  f"{b(c.allow_preconfig)}, {b('deprecated' in c.features)}}},")
    if not cmds:
        cc.append("      {\"\", nullptr, false, false, false},")
    cc += ["  };",
           f"  return std::span<const CommandEntry>(table, {len(cmds)});",
           "}", "", "}  // namespace blockd::qapi"]
    return "\n".join(h) + "\n", "\n".join(cc) + "\n"
