// Handlers of the QMP control commands: negotiation, version, command list, schema, quit.
#include "qapi/commands.h"
#include "qapi/introspect.h"
#include "qapi/visit.h"
#include "qmp/context.h"
#include "qmp/version.h"

namespace blockd::qapi {

Status qmp_qmp_capabilities(qmp::Context&, const QmpCapabilitiesArgs&) {
  // Negotiation is done by the monitor session before any other command; a session that reaches
  // the dispatcher has negotiated already (an in-process Engine needs no negotiation).
  return Status::error(ErrorClass::kCommandNotFound,
                       "Capabilities negotiation is already complete, command ignored");
}

Expected<VersionInfo> qmp_query_version(qmp::Context&) {
  VersionInfo info;
  Status status = from_json(qmp::version_info(), info, InputMode::kQmp, "");
  if (!status) return status;
  return info;
}

Expected<std::vector<CommandInfo>> qmp_query_commands(qmp::Context&) {
  std::vector<CommandInfo> commands;
  for (const auto& entry : command_table()) {
    CommandInfo info;
    info.name = std::string(entry.name);
    commands.push_back(std::move(info));
  }
  return commands;
}

Expected<nlohmann::json> qmp_query_qmp_schema(qmp::Context&) { return qmp_schema_introspection(); }

Status qmp_quit(qmp::Context& context) {
  context.request_shutdown();
  return Status::ok();
}

}  // namespace blockd::qapi
