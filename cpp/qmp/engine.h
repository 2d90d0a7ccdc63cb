// Engine: blockd's public C++ entry point — the block graph, its loops and its QMP command set.
//
// Creating an Engine starts the main loop thread. Commands reach it as QMP requests (execute()),
// command-line options (cli_option()) or monitor sessions (open_monitor()); all of them run on the
// main loop. Every method here is safe to call from any thread except the main loop itself, and
// blocks until the work is done.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "qmp/context.h"
#include "qmp/event_bus.h"
#include "qmp/monitor.h"
#include "runtime/loop.h"

namespace blockd::qmp {

class Engine {
 public:
  static Expected<std::unique_ptr<Engine>> create();
  // Shuts down (see shutdown()).
  ~Engine();

  // Runs one QMP request given as JSON text and returns the reply as JSON text. No negotiation is
  // needed; malformed text gets the same error replies a monitor would give.
  std::string execute(std::string_view request);

  // Applies a qemu-storage-daemon command-line option: `kind` is "blockdev", "object",
  // "nbd-server" or "export"; `options` the option's value as JSON (with every scalar a string
  // when `keyval` is true, as the keyval parser produces).
  Status cli_option(std::string_view kind, const nlohmann::json& options, bool keyval);

  // Opens a monitor session for a QMP connection.
  std::unique_ptr<Monitor> open_monitor();

  // The next event of the in-process event stream (JSON text), or nothing after `timeout`.
  std::optional<std::string> next_event(std::chrono::milliseconds timeout);

  // Waits until shutdown is requested (QMP quit) or `timeout` passes; true if requested.
  bool wait_shutdown(std::optional<std::chrono::milliseconds> timeout);

  // Stops exports, drains and flushes every node, and stops all threads. Idempotent; after it,
  // commands fail with a GenericError.
  void shutdown();

  EventBus& events() noexcept { return events_; }

 private:
  friend class Monitor;
  Engine() = default;
  // Runs a parsed request on the main loop.
  nlohmann::json run(const nlohmann::json& request);

  EventBus events_;
  std::unique_ptr<LoopThread> main_thread_;
  std::unique_ptr<Context> context_;
  std::mutex state_mutex_;
  bool stopped_ = false;

  int subscription_ = 0;
  std::mutex queue_mutex_;
  std::condition_variable queue_cv_;
  std::deque<std::string> queue_;
};

// Parses one JSON value as QMP does and returns it, or the error reply for malformed text.
Expected<nlohmann::json> parse_request(std::string_view text);

}  // namespace blockd::qmp
