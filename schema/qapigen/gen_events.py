"""Writes events.h/events.cc: one emit_<event>() function per event."""

from __future__ import annotations

from .cpp import cpp_string
from .gen_types import HEADER
from .model import Schema, c_command


def gen_events(schema: Schema) -> tuple[str, str]:
    h = [HEADER, "// Typed emitters for the QMP events of the schema.", "#pragma once", "",
         '#include "qapi/types.h"', "",
         "namespace blockd::qmp {", "class EventBus;", "}  // namespace blockd::qmp", "",
         "namespace blockd::qapi {", "",
         "// Each emit_<event>() converts the data to JSON and hands it to bus.emit(); events",
         "// without data pass a null JSON value (no 'data' member).", ""]
    cc = [HEADER, '#include "qapi/events.h"', "", '#include "qapi/visit.h"',
          '#include "qmp/event_bus.h"', "", "namespace blockd::qapi {", ""]
    for e in schema.events:
        fn = f"emit_{c_command(e.name).lower()}"
        if e.arg_type is None:
            sig = f"void {fn}(qmp::EventBus& bus)"
            body = f"  bus.emit({cpp_string(e.name)}, nlohmann::json());"
        else:
            sig = f"void {fn}(qmp::EventBus& bus, const {e.arg_type.name}& data)"
            body = f"  bus.emit({cpp_string(e.name)}, to_json(data));"
        h.append(f"// {e.name}")
        h.append(sig + ";")
        cc += [sig + " {", body, "}", ""]
    h += ["", "}  // namespace blockd::qapi"]
    cc.append("}  // namespace blockd::qapi")
    return "\n".join(h) + "\n", "\n".join(cc) + "\n"
