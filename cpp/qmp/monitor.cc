#include "qmp/monitor.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include "qmp/dispatcher.h"
#include "qmp/engine.h"
#include "qmp/version.h"

namespace blockd::qmp {

Monitor::Monitor(Engine& engine) : engine_(engine) {
  event_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

Monitor::~Monitor() {
  if (subscription_ != 0) engine_.events().unsubscribe(subscription_);
  if (event_fd_ >= 0) ::close(event_fd_);
}

std::string Monitor::greeting() const {
  nlohmann::json greeting = {
      {"QMP", {{"version", version_info()}, {"capabilities", nlohmann::json::array()}}}};
  return to_line(greeting);
}

std::vector<std::string> Monitor::feed(std::string_view bytes) {
  std::vector<JsonStream::Item> items;
  stream_.feed(bytes, items);
  std::vector<std::string> replies;
  for (auto& item : items) {
    if (wants_close_) break;
    if (!item.ok) {
      replies.push_back(to_line(error_reply(Status::generic(item.text))));
      continue;
    }
    replies.push_back(handle(item.text));
  }
  return replies;
}

std::string Monitor::handle(const std::string& text) {
  auto request = parse_request(text);
  if (!request) return to_line(error_reply(request.status()));
  const nlohmann::json& value = *request;
  const bool is_capabilities =
      value.is_object() && value.contains("execute") && value["execute"] == "qmp_capabilities";
  if (!negotiated_) {
    if (value.is_object() && value.contains("execute") && value["execute"].is_string() &&
        !is_capabilities) {
      nlohmann::json reply =
          error_reply(Status::error(ErrorClass::kCommandNotFound,
                                    "Expecting capabilities negotiation with 'qmp_capabilities'"));
      if (auto id = value.find("id"); id != value.end()) reply["id"] = *id;
      return to_line(reply);
    }
    if (is_capabilities) {
      nlohmann::json reply = negotiate(value);
      if (reply.contains("error")) return to_line(reply);
      negotiated_ = true;
      subscription_ = engine_.events().subscribe([this](const std::string& line) {
        {
          std::lock_guard lock(events_mutex_);
          events_.push_back(line);
        }
        uint64_t one = 1;
        [[maybe_unused]] ssize_t written = ::write(event_fd_, &one, sizeof one);
      });
      return to_line(reply);
    }
  } else if (is_capabilities) {
    nlohmann::json reply =
        error_reply(Status::error(ErrorClass::kCommandNotFound,
                                  "Capabilities negotiation is already complete, command ignored"));
    if (auto id = value.find("id"); id != value.end()) reply["id"] = *id;
    return to_line(reply);
  }
  nlohmann::json reply = engine_.run(value);
  if (value.is_object() && value.contains("execute") && value["execute"] == "quit" &&
      !reply.contains("error")) {
    wants_close_ = true;
  }
  return to_line(reply);
}

nlohmann::json Monitor::negotiate(const nlohmann::json& request) {
  // blockd offers no optional capability (QEMU's only one is out-of-band execution), so the only
  // valid request enables nothing.
  Status status;
  for (const auto& [key, value] : request.items()) {
    if (key != "execute" && key != "arguments" && key != "id") {
      status = Status::generic("QMP input member '" + key + "' is unexpected");
    }
  }
  if (auto args = request.find("arguments"); status && args != request.end()) {
    if (!args->is_object()) {
      status = Status::generic("QMP input member 'arguments' must be an object");
    } else {
      for (const auto& [key, value] : args->items()) {
        if (key != "enable") {
          status = Status::generic("Parameter '" + key + "' is unexpected");
        } else if (!value.is_array()) {
          status = Status::generic("Invalid parameter type for 'enable', expected: array");
        } else if (!value.empty()) {
          const auto& first = value.front();
          status =
              first.is_string()
                  ? Status::generic("Capability '" + first.get<std::string>() + "' not available")
                  : Status::generic("Invalid parameter type for 'enable[0]', expected: string");
        }
      }
    }
  }
  nlohmann::json reply =
      status ? nlohmann::json{{"return", nlohmann::json::object()}} : error_reply(status);
  if (auto id = request.find("id"); id != request.end()) reply["id"] = *id;
  return reply;
}

void Monitor::close() {
  if (subscription_ != 0) engine_.events().unsubscribe(subscription_);
  subscription_ = 0;
  wants_close_ = true;
}

std::vector<std::string> Monitor::take_events() {
  uint64_t count;
  [[maybe_unused]] ssize_t got = ::read(event_fd_, &count, sizeof count);
  std::lock_guard lock(events_mutex_);
  std::vector<std::string> out;
  out.swap(events_);
  return out;
}

}  // namespace blockd::qmp
