#include "qmp/event_bus.h"

#include <sys/time.h>

#include <algorithm>

namespace blockd::qmp {
namespace {

constexpr std::chrono::nanoseconds kOneSecond = std::chrono::seconds(1);

// The throttling key of an event: events with the same key share a window.
std::string throttle_key(std::string_view name, const nlohmann::json& data) {
  std::string key(name);
  if (name == "QUORUM_REPORT_BAD" && data.is_object()) {
    if (auto it = data.find("node-name"); it != data.end() && it->is_string()) {
      key += '\0';
      key += it->get<std::string>();
    }
  }
  return key;
}

}  // namespace

std::chrono::nanoseconds EventBus::rate_limit(std::string_view name) {
  // The block-layer events the QEMU monitor throttles (its table also lists device events that
  // blockd never emits).
  if (name == "QUORUM_REPORT_BAD" || name == "QUORUM_FAILURE") return kOneSecond;
  return std::chrono::nanoseconds(0);
}

EventBus::~EventBus() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  timer_cv_.notify_all();
  if (timer_.joinable()) timer_.join();
}

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

int64_t EventBus::now_ns() const {
  if (manual_now_ns_) return *manual_now_ns_;
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void EventBus::deliver(const std::string& line) {
  for (auto& [handle, subscriber] : subscribers_) subscriber(line);
}

void EventBus::emit(std::string_view name, nlohmann::json data) {
  timeval now{};
  gettimeofday(&now, nullptr);
  const std::string key = throttle_key(name, data);
  nlohmann::json event = {
      {"timestamp", {{"seconds", now.tv_sec}, {"microseconds", now.tv_usec}}},
      {"event", name},
  };
  if (!data.is_null()) event["data"] = std::move(data);
  std::string line = event.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  const std::chrono::nanoseconds rate = rate_limit(name);
  std::lock_guard lock(mutex_);
  if (rate.count() == 0) {
    deliver(line);
    return;
  }
  const int64_t clock = now_ns();
  // A window that should have closed already (the timer thread has not run yet) closes first, so
  // the order of delivery is the order of the clock.
  close_windows(clock);
  auto [it, opened] = windows_.try_emplace(key);
  if (!opened) {
    it->second.pending = std::move(line);
    return;
  }
  it->second.closes_at_ns = clock + rate.count();
  deliver(line);
  if (!manual_now_ns_) start_timer_locked();
  timer_cv_.notify_all();
}

void EventBus::close_windows(int64_t now) {
  // Windows close in the order of their end time, each at its end time: an event pending in one
  // opens the next window from that moment.
  while (true) {
    auto first = std::min_element(windows_.begin(), windows_.end(), [](const auto& a, const auto& b) {
      return a.second.closes_at_ns < b.second.closes_at_ns;
    });
    if (first == windows_.end() || first->second.closes_at_ns > now) return;
    Window& window = first->second;
    if (!window.pending) {
      windows_.erase(first);
      continue;
    }
    deliver(*window.pending);
    window.pending.reset();
    const std::string_view name(first->first.c_str());  // the event name ends at the first NUL
    window.closes_at_ns += rate_limit(name).count();
  }
}

void EventBus::start_timer_locked() {
  if (timer_.joinable()) return;
  timer_ = std::thread([this] { timer_main(); });
}

void EventBus::timer_main() {
  std::unique_lock lock(mutex_);
  while (!stopping_) {
    if (manual_now_ns_ || windows_.empty()) {
      timer_cv_.wait(lock);
      continue;
    }
    int64_t next = INT64_MAX;
    for (const auto& [key, window] : windows_) next = std::min(next, window.closes_at_ns);
    const int64_t now = now_ns();
    if (next > now) {
      timer_cv_.wait_for(lock, std::chrono::nanoseconds(next - now));
      continue;
    }
    close_windows(now);
  }
}

void EventBus::TEST_use_manual_clock() {
  std::lock_guard lock(mutex_);
  if (manual_now_ns_) return;
  close_windows(INT64_MAX);
  windows_.clear();
  manual_now_ns_ = 0;
  timer_cv_.notify_all();
}

void EventBus::TEST_advance_clock(std::chrono::nanoseconds delta) {
  std::lock_guard lock(mutex_);
  if (!manual_now_ns_) return;
  *manual_now_ns_ += delta.count();
  close_windows(*manual_now_ns_);
}

}  // namespace blockd::qmp
