// EventBus: fans QMP events out to every subscriber (each negotiated monitor and the in-process
// event queue of blockd.Engine).
//
// emit() may be called from any thread. It stamps the event with the wall-clock time, as QMP
// requires, and hands each subscriber the event as one line of JSON text.
#pragma once

#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace blockd::qmp {

class EventBus {
 public:
  // Called with the event's JSON text (no trailing newline). Called on the emitting thread with the
  // bus lock held: a subscriber must only queue the line, never call back into the bus.
  using Subscriber = std::function<void(const std::string& line)>;

  // Registers a subscriber; returns its handle for unsubscribe().
  int subscribe(Subscriber subscriber);
  void unsubscribe(int handle);

  // Emits event `name` with `data` (an object, or null for events without data).
  void emit(std::string_view name, nlohmann::json data);

 private:
  std::mutex mutex_;
  std::map<int, Subscriber> subscribers_;
  int next_handle_ = 1;
};

}  // namespace blockd::qmp
