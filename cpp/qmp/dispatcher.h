// The QMP command dispatcher: validates the envelope of a request and runs its command.
//
// The envelope rules and error texts follow QEMU (qmp-dispatch): a request must be an object with a
// string "execute", an optional object "arguments" and an optional "id" of any JSON type, which is
// echoed in the reply. Argument validation and marshalling are generated from the schema.
#pragma once

#include <nlohmann/json.hpp>

#include "qapi/visit.h"
#include "qmp/context.h"

namespace blockd::qmp {

// Runs `request` (already parsed) and returns the reply object ({"return": ...} or {"error": ...},
// with "id" when the request had one). Main loop only. `mode` is kKeyval for command-line options.
nlohmann::json dispatch(Context& context, const nlohmann::json& request, qapi::InputMode mode);

// Builds an error reply.
nlohmann::json error_reply(const Status& status);

// Serialises a reply or event as one line of JSON text. Strings that are not valid UTF-8 (a client
// may send any bytes) have the bad bytes replaced rather than failing the reply.
std::string to_line(const nlohmann::json& value);

}  // namespace blockd::qmp
