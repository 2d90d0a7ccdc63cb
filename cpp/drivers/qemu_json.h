// "json:{...}" file names with QEMU's exact text.
//
// QEMU reports the file name of a node whose options cannot be expressed as a plain path as
// "json:" followed by its options, printed from a QDict. A QDict prints its keys in hash-bucket
// order (not insertion or alphabetical order) and separates items with ", " and ": ". Management
// tools compare these strings, so blockd reproduces the order and the spacing.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace blockd::drivers {

// Formats `value` as QEMU's qobject_to_json would print the equivalent QObject: objects in QDict
// iteration order, ", " and ": " separators, non-ASCII and control characters escaped as \uXXXX.
// Pure function; any thread.
std::string qemu_json_text(const nlohmann::json& value);

// "json:" + qemu_json_text(options): the file name QEMU reports for a node opened with `options`.
std::string json_filename(const nlohmann::json& options);

}  // namespace blockd::drivers
