#include "qmp/dispatcher.h"

#include "qapi/commands.h"

namespace blockd::qmp {

nlohmann::json error_reply(const Status& status) {
  return {{"error",
           {{"class", std::string(error_class_name(status.error_class()))},
            {"desc", status.message()}}}};
}

std::string to_line(const nlohmann::json& value) {
  return value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

namespace {

Status check_envelope(const nlohmann::json& request) {
  if (!request.is_object()) return Status::generic("QMP input must be a JSON object");
  for (const auto& [key, value] : request.items()) {
    if (key == "execute") {
      if (!value.is_string()) return Status::generic("QMP input member 'execute' must be a string");
    } else if (key == "arguments") {
      if (!value.is_object()) {
        return Status::generic("QMP input member 'arguments' must be an object");
      }
    } else if (key != "id") {
      return Status::generic("QMP input member '" + key + "' is unexpected");
    }
  }
  if (!request.contains("execute")) return Status::generic("QMP input lacks member 'execute'");
  return Status::ok();
}

}  // namespace

nlohmann::json dispatch(Context& context, const nlohmann::json& request, qapi::InputMode mode) {
  nlohmann::json reply;
  if (Status status = check_envelope(request); !status) {
    reply = error_reply(status);
  } else {
    const std::string& name = request["execute"].get_ref<const std::string&>();
    const qapi::CommandEntry* entry = nullptr;
    for (const auto& candidate : qapi::command_table()) {
      if (candidate.name == name) {
        entry = &candidate;
        break;
      }
    }
    if (entry == nullptr) {
      reply = error_reply(Status::error(ErrorClass::kCommandNotFound,
                                        "The command " + name + " has not been found"));
    } else {
      static const nlohmann::json kNoArguments = nlohmann::json::object();
      auto it = request.find("arguments");
      auto result = entry->marshal(context, it != request.end() ? *it : kNoArguments, mode);
      if (result) {
        reply = {{"return", std::move(result).value()}};
      } else {
        reply = error_reply(result.status());
      }
    }
  }
  if (request.is_object()) {
    if (auto id = request.find("id"); id != request.end()) reply["id"] = *id;
  }
  return reply;
}

}  // namespace blockd::qmp
