// Monitor: one QMP session (one socket connection) on an Engine.
//
// It owns the session state that QEMU's QMP monitor has: the greeting, capabilities negotiation
// (until qmp_capabilities succeeds only that command is accepted, everything else gets
// CommandNotFound), the JSON stream of the connection, and the queue of events for this session
// (events are delivered only after negotiation). The transport (socket reading and writing) is the
// caller's: it feeds bytes in and sends the returned lines out.
//
// Threads: feed() and the other methods may be called from any one thread at a time (the Python
// server's connection thread); commands themselves run on the engine's main loop.
#pragma once

#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qmp/json_stream.h"

namespace blockd::qmp {

class Engine;

class Monitor {
 public:
  // Use Engine::open_monitor().
  explicit Monitor(Engine& engine);
  ~Monitor();
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;

  // The greeting line to send when the connection opens.
  std::string greeting() const;

  // Consumes bytes from the client; returns the reply lines (JSON text, no newline) to send, in
  // order.
  std::vector<std::string> feed(std::string_view bytes);

  // Events queued for this session since the last call.
  std::vector<std::string> take_events();
  // An eventfd that is readable while events are queued.
  int event_fd() const noexcept { return event_fd_; }

  // True once the client asked to quit; the transport should close after sending the reply.
  bool wants_close() const noexcept { return wants_close_; }

  // Ends the session: no more events are queued and later input is ignored.
  void close();

 private:
  std::string handle(const std::string& text);
  nlohmann::json negotiate(const nlohmann::json& request);

  Engine& engine_;
  JsonStream stream_;
  bool negotiated_ = false;
  bool wants_close_ = false;
  int subscription_ = 0;
  int event_fd_ = -1;
  std::mutex events_mutex_;
  std::vector<std::string> events_;
};

}  // namespace blockd::qmp
