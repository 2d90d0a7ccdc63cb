#include "qmp/event_bus.h"

#include <sys/time.h>

namespace blockd::qmp {

int EventBus::subscribe(Subscriber subscriber) {
  std::lock_guard lock(mutex_);
  const int handle = next_handle_++;
  subscribers_.emplace(handle, std::move(subscriber));
  return handle;
}

void EventBus::unsubscribe(int handle) {
  std::lock_guard lock(mutex_);
  subscribers_.erase(handle);
}

void EventBus::emit(std::string_view name, nlohmann::json data) {
  timeval now{};
  gettimeofday(&now, nullptr);
  nlohmann::json event = {
      {"timestamp", {{"seconds", now.tv_sec}, {"microseconds", now.tv_usec}}},
      {"event", name},
  };
  if (!data.is_null()) event["data"] = std::move(data);
  const std::string line = event.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  std::lock_guard lock(mutex_);
  for (auto& [handle, subscriber] : subscribers_) subscriber(line);
}

}  // namespace blockd::qmp
