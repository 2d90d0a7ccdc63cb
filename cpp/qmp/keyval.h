// The keyval option syntax of QEMU's command line ("driver=file,filename=a.img,cache.direct=on").
//
// Parameters are separated by ',' and a literal comma inside a value is written ",,". Keys are
// dotted paths whose fragments consist of letters, digits, '-' and '_'; dots build nested objects,
// and a level whose keys are all 0, 1, 2, ... becomes a list. A later duplicate key replaces an
// earlier one. With an implied key, a first parameter without '=' is that key's value
// ("--object iothread,id=io0" implies qom-type=iothread). Every value is a string: converting it
// to the schema's type is the job of the QAPI visitor's keyval mode.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string_view>

#include "runtime/status.h"

namespace blockd::qmp {

// Parses `text`; errors use QEMU's wording (GenericError).
Expected<nlohmann::json> keyval_parse(std::string_view text,
                                      std::optional<std::string_view> implied_key = std::nullopt);

}  // namespace blockd::qmp
