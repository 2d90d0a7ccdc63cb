// The version blockd reports in the QMP greeting and query-version.
#pragma once

#include <nlohmann/json.hpp>

namespace blockd::qmp {

// A VersionInfo object. blockd speaks the QMP interface of QEMU 7.2, so it reports that version in
// "qemu" (clients use it to decide which commands and members exist) and names itself in
// "package".
nlohmann::json version_info();

}  // namespace blockd::qmp
