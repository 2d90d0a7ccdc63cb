// EventBus: fans QMP events out to every subscriber (each negotiated monitor and the in-process
// event queue of blockd.Engine), with the QEMU monitor's rate limiting.
//
// emit() may be called from any thread. It stamps the event with the wall-clock time, as QMP
// requires, and hands each subscriber the event as one line of JSON text.
//
// Rate limiting follows the QEMU monitor: some events are throttled per key (QUORUM_REPORT_BAD
// per "node-name", QUORUM_FAILURE with a single key) to one per second. The first event of a key
// is delivered at once and opens a one-second window; events of that key arriving inside the
// window replace one another and only the newest is delivered when the window closes, which opens
// the next window. A window that closes with nothing pending ends the throttling of that key. A
// delayed event keeps the timestamp of the moment it was emitted.
//
// Windows are timed by a monotonic clock: the real one (a timer thread the bus starts on first
// use), or a manual clock that only moves when the owner calls advance_clock(). Tests use the
// latter to check throttling without sleeping.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

namespace blockd::qmp {

class EventBus {
 public:
  // Called with the event's JSON text (no trailing newline). Called on the emitting thread (or the
  // bus's timer thread, for a delayed event) with the bus lock held: a subscriber must only queue
  // the line, never call back into the bus.
  using Subscriber = std::function<void(const std::string& line)>;

  EventBus() = default;
  // Stops the timer thread. Events still held in a throttling window are dropped, as in QEMU.
  ~EventBus();
  EventBus(const EventBus&) = delete;
  EventBus& operator=(const EventBus&) = delete;

  // Registers a subscriber; returns its handle for unsubscribe().
  int subscribe(Subscriber subscriber);
  void unsubscribe(int handle);

  // Emits event `name` with `data` (an object, or null for events without data), subject to rate
  // limiting.
  void emit(std::string_view name, nlohmann::json data);

  // The throttling interval of event `name` (zero: not throttled).
  static std::chrono::nanoseconds rate_limit(std::string_view name);

  // ---- Test clock (TEST_ hooks: not reachable from QMP). From any thread.
  // Switches the throttling windows to a manual clock that starts at 0 and moves only with
  // TEST_advance_clock(). Windows open at that moment are closed first (their pending events
  // delivered).
  void TEST_use_manual_clock();
  // Moves the manual clock forward by `delta`, closing (in order) every window that ends on the
  // way, exactly as the real clock would. Does nothing on the real clock.
  void TEST_advance_clock(std::chrono::nanoseconds delta);

 private:
  struct Window {
    int64_t closes_at_ns = 0;              // on the bus clock
    std::optional<std::string> pending;    // newest event emitted inside the window
  };

  int64_t now_ns() const;
  void deliver(const std::string& line);
  // Closes every window whose end is at or before `now`; the lock is held.
  void close_windows(int64_t now);
  void timer_main();
  void start_timer_locked();

  std::mutex mutex_;
  std::map<int, Subscriber> subscribers_;
  int next_handle_ = 1;

  // Throttling state, by key (event name, plus the node name for QUORUM_REPORT_BAD).
  std::map<std::string, Window> windows_;
  std::optional<int64_t> manual_now_ns_;
  std::condition_variable timer_cv_;
  std::thread timer_;
  bool stopping_ = false;
};

}  // namespace blockd::qmp
