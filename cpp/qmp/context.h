// Context: the engine state that QMP handlers work on.
//
// One Context per Engine. It lives on the main loop thread, and every handler runs there, so its
// members need no locking; other threads reach it only through Engine, which posts to the main
// loop.
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "block/graph.h"
#include "block/job.h"
#include "exports/export.h"
#include "exports/nbd/server.h"
#include "qmp/event_bus.h"
#include "runtime/event.h"
#include "runtime/loop.h"
#include "tls/credentials.h"

namespace blockd::qmp {

// A user-created object (object-add): an iothread, and later TLS credentials and secrets.
class UserObject {
 public:
  virtual ~UserObject() = default;
  virtual std::string_view type_name() const noexcept = 0;
};

class IoThread final : public UserObject {
 public:
  IoThread(std::unique_ptr<LoopThread> thread, int64_t poll_max_ns, int64_t poll_grow,
           int64_t poll_shrink, int64_t aio_max_batch)
      : thread_(std::move(thread)),
        poll_max_ns(poll_max_ns),
        poll_grow(poll_grow),
        poll_shrink(poll_shrink),
        aio_max_batch(aio_max_batch) {}
  std::string_view type_name() const noexcept override { return "iothread"; }
  LoopThread& thread() noexcept { return *thread_; }

 private:
  std::unique_ptr<LoopThread> thread_;

 public:
  // Tunables reported by query-iothreads. blockd's loops block in io_uring rather than polling, so
  // the polling parameters are kept for compatibility and reporting only.
  int64_t poll_max_ns;
  int64_t poll_grow;
  int64_t poll_shrink;
  int64_t aio_max_batch;
};

// A tls-creds-x509 or tls-creds-psk object. Servers and sessions share the credentials, so deleting the object
// leaves them working (as in QEMU).
class TlsCredsObject final : public UserObject {
 public:
  explicit TlsCredsObject(std::shared_ptr<const tls::Credentials> credentials)
      : credentials_(std::move(credentials)) {}
  std::string_view type_name() const noexcept override {
    return credentials_->kind() == tls::Credentials::Kind::kPsk ? "tls-creds-psk"
                                                                : "tls-creds-x509";
  }
  const std::shared_ptr<const tls::Credentials>& credentials() const noexcept {
    return credentials_;
  }

 private:
  std::shared_ptr<const tls::Credentials> credentials_;
};

class Context {
 public:
  Context(Loop& main_loop, EventBus& events)
      : main_loop_(main_loop),
        events_(events),
        jobs_(main_loop, [this](const block::Job& job) { job_status_changed(job); }) {}

  Loop& main_loop() noexcept { return main_loop_; }
  EventBus& events() noexcept { return events_; }
  block::Graph& graph() noexcept { return graph_; }
  // Background jobs (blockdev-create); their status changes become JOB_STATUS_CHANGE events.
  block::JobRegistry& jobs() noexcept { return jobs_; }

  // Objects by id, in creation order of ids (query-iothreads lists them in this map's order).
  std::map<std::string, std::unique_ptr<UserObject>>& objects() noexcept { return objects_; }
  // The credentials of the tls-creds object `id` (tls-creds of nbd-server-start and of the nbd
  // driver), which must be for `endpoint`. Errors (GenericError), as QEMU words them: no such
  // object, an object that is not TLS credentials, credentials for the other endpoint.
  Expected<std::shared_ptr<const tls::Credentials>> tls_credentials(const std::string& id,
                                                                    tls::Endpoint endpoint) {
    auto found = objects_.find(id);
    if (found == objects_.end()) return Status::generic("No TLS credentials with id '" + id + "'");
    auto* creds = dynamic_cast<TlsCredsObject*>(found->second.get());
    if (creds == nullptr) {
      return Status::generic("Object with id '" + id + "' is not TLS credentials");
    }
    if (creds->credentials()->endpoint() != endpoint) {
      return Status::generic(endpoint == tls::Endpoint::kServer
                                 ? "Expected TLS credentials for a server endpoint"
                                 : "Expected TLS credentials for a client endpoint");
    }
    return creds->credentials();
  }

  // Block exports, most recently added first (the order query-block-exports lists them in).
  std::vector<std::shared_ptr<exports::Export>>& exports() noexcept { return exports_; }
  // The NBD server of nbd-server-start (null while stopped).
  std::unique_ptr<exports::nbd::Server>& nbd_server() noexcept { return nbd_server_; }
  // Notified whenever an export has been removed from exports().
  Event& exports_changed() noexcept { return exports_changed_; }

  // Runs `task` to completion on the main loop, from a handler (which runs on the main loop):
  // the loop keeps serving other work while it waits, as QEMU's nested polling does.
  template <typename T>
  T run_nested(Task<T> task) {
    std::optional<T> result;
    main_loop_.spawn([](Task<T> inner, std::optional<T>& out) -> Task<void> {
      out.emplace(co_await std::move(inner));
    }(std::move(task), result));
    main_loop_.run_until([&] { return result.has_value(); });
    return std::move(*result);
  }

  // Shutdown requests (QMP quit, signals): observed by Engine::wait_shutdown.
  void request_shutdown();
  bool shutdown_requested() const noexcept { return shutdown_requested_.load(); }
  bool wait_shutdown(std::optional<std::chrono::milliseconds> timeout);

 private:
  // Emits JOB_STATUS_CHANGE (defined with the job command handlers).
  void job_status_changed(const block::Job& job);

  Loop& main_loop_;
  EventBus& events_;
  block::Graph graph_;
  std::map<std::string, std::unique_ptr<UserObject>> objects_;
  std::vector<std::shared_ptr<exports::Export>> exports_;
  std::unique_ptr<exports::nbd::Server> nbd_server_;
  Event exports_changed_;
  std::atomic<bool> shutdown_requested_{false};
  std::mutex shutdown_mutex_;
  std::condition_variable shutdown_cv_;
  // Last, so that jobs (which may hold nodes) go before the graph.
  block::JobRegistry jobs_;
};

}  // namespace blockd::qmp
