#include "qmp/engine.h"

#include <cctype>

#include "qmp/dispatcher.h"
#include "qmp/version.h"

namespace blockd::qapi {
// Defined in handlers/exports.cc.
Status nbd_server_start_options(qmp::Context& context, const NbdServerOptions& options);
void stop_all_exports(qmp::Context& context);
}  // namespace blockd::qapi

namespace blockd::qmp {

nlohmann::json version_info() {
  return {{"qemu", {{"major", 7}, {"minor", 2}, {"micro", 0}}}, {"package", "blockd 0.1.0"}};
}

void Context::request_shutdown() {
  {
    std::lock_guard lock(shutdown_mutex_);
    shutdown_requested_ = true;
  }
  shutdown_cv_.notify_all();
}

bool Context::wait_shutdown(std::optional<std::chrono::milliseconds> timeout) {
  std::unique_lock lock(shutdown_mutex_);
  auto requested = [this] { return shutdown_requested_.load(); };
  if (!timeout) {
    shutdown_cv_.wait(lock, requested);
    return true;
  }
  return shutdown_cv_.wait_for(lock, *timeout, requested);
}

namespace {

// Describes why `text` is not valid JSON, in QEMU's words for the common mistakes (a bare word,
// a missing value) and in the JSON library's words otherwise.
std::string describe_parse_error(std::string_view text, std::string library_message) {
  bool in_string = false;
  bool escaped = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (std::isalpha(static_cast<unsigned char>(c))) {
      size_t end = i;
      while (end < text.size() && std::isalnum(static_cast<unsigned char>(text[end]))) ++end;
      const std::string_view word = text.substr(i, end - i);
      if (word != "true" && word != "false" && word != "null") {
        return "invalid keyword '" + std::string(word) + "'";
      }
      i = end - 1;
    }
  }
  // Drop the library's "[json.exception.parse_error.101] " tag.
  if (auto end = library_message.find("] ");
      library_message.starts_with("[json.exception") && end != std::string::npos) {
    library_message.erase(0, end + 2);
  }
  if (library_message.find("while parsing value") != std::string::npos) return "expecting value";
  return library_message;
}

}  // namespace

Expected<nlohmann::json> parse_request(std::string_view text) {
  nlohmann::json value = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) {
    // Re-parse with exceptions only to obtain the description of what is wrong.
    try {
      nlohmann::json unused = nlohmann::json::parse(text);
      (void)unused;
    } catch (const nlohmann::json::exception& error) {
      return Status::generic("JSON parse error, " + describe_parse_error(text, error.what()));
    }
    return Status::generic("JSON parse error");
  }
  return value;
}

Expected<std::unique_ptr<Engine>> Engine::create() {
  std::unique_ptr<Engine> engine(new Engine());
  auto thread = LoopThread::start("blockd-main");
  if (!thread) return thread.status();
  engine->main_thread_ = std::move(thread).value();
  Loop& loop = engine->main_thread_->loop();
  engine->context_ = std::make_unique<Context>(loop, engine->events_);
  Engine* raw = engine.get();
  engine->subscription_ = engine->events_.subscribe([raw](const std::string& line) {
    {
      std::lock_guard lock(raw->queue_mutex_);
      raw->queue_.push_back(line);
    }
    raw->queue_cv_.notify_one();
  });
  return engine;
}

Engine::~Engine() {
  shutdown();
  events_.unsubscribe(subscription_);
}

nlohmann::json Engine::run(const nlohmann::json& request) {
  std::lock_guard lock(state_mutex_);
  if (stopped_) return error_reply(Status::generic("The block engine has been shut down"));
  return main_thread_->loop().call(
      [&] { return dispatch(*context_, request, qapi::InputMode::kQmp); });
}

std::string Engine::execute(std::string_view request) {
  JsonStream stream;
  std::vector<JsonStream::Item> items;
  stream.feed(request, items);
  // A bare scalar is only complete once something follows it.
  if (items.empty() && stream.pending_bytes() > 0) stream.feed(" ", items);
  if (items.size() != 1) {
    return error_reply(Status::generic(items.empty() ? "QMP input is empty or incomplete"
                                                     : "QMP input must be exactly one request"))
        .dump();
  }
  if (!items[0].ok) return to_line(error_reply(Status::generic(items[0].text)));
  auto parsed = parse_request(items[0].text);
  if (!parsed) return to_line(error_reply(parsed.status()));
  return to_line(run(*parsed));
}

Status Engine::cli_option(std::string_view kind, const nlohmann::json& options, bool keyval) {
  std::string command;
  if (kind == "blockdev") {
    command = "blockdev-add";
  } else if (kind == "object") {
    command = "object-add";
  } else if (kind == "export") {
    command = "block-export-add";
  } else if (kind == "nbd-server") {
    // No QMP command takes NbdServerOptions (nbd-server-start takes the legacy address form).
    std::lock_guard lock(state_mutex_);
    if (stopped_) return Status::generic("The block engine has been shut down");
    return main_thread_->loop().call([&]() -> Status {
      qapi::NbdServerOptions parsed;
      BLOCKD_RETURN_IF_ERROR(qapi::from_json(
          options, parsed, keyval ? qapi::InputMode::kKeyval : qapi::InputMode::kQmp, ""));
      return qapi::nbd_server_start_options(*context_, parsed);
    });
  } else {
    return Status::generic("Unsupported option kind '" + std::string(kind) + "'");
  }
  nlohmann::json request = {{"execute", command}, {"arguments", options}};
  nlohmann::json reply;
  {
    std::lock_guard lock(state_mutex_);
    if (stopped_) return Status::generic("The block engine has been shut down");
    reply = main_thread_->loop().call([&] {
      return dispatch(*context_, request,
                      keyval ? qapi::InputMode::kKeyval : qapi::InputMode::kQmp);
    });
  }
  if (auto error = reply.find("error"); error != reply.end()) {
    const std::string cls = (*error)["class"];
    ErrorClass error_class = ErrorClass::kGenericError;
    if (cls == "CommandNotFound") error_class = ErrorClass::kCommandNotFound;
    if (cls == "DeviceNotFound") error_class = ErrorClass::kDeviceNotFound;
    return Status::error(error_class, (*error)["desc"]);
  }
  return Status::ok();
}

std::unique_ptr<Monitor> Engine::open_monitor() { return std::make_unique<Monitor>(*this); }

std::optional<std::string> Engine::next_event(std::chrono::milliseconds timeout) {
  std::unique_lock lock(queue_mutex_);
  if (!queue_cv_.wait_for(lock, timeout, [this] { return !queue_.empty(); })) return std::nullopt;
  std::string line = std::move(queue_.front());
  queue_.pop_front();
  return line;
}

bool Engine::wait_shutdown(std::optional<std::chrono::milliseconds> timeout) {
  return context_->wait_shutdown(timeout);
}

namespace {

// Flushes every node so that nothing written is lost when the engine stops.
Task<void> flush_all(std::vector<std::shared_ptr<block::Node>> nodes) {
  for (auto& node : nodes) {
    if (node->read_only()) continue;
    if (&node->loop() == Loop::current()) {
      (void)co_await node->flush();
    } else {
      node->loop().run_task(node->flush());
    }
  }
}

}  // namespace

void Engine::shutdown() {
  std::lock_guard lock(state_mutex_);
  if (stopped_) return;
  stopped_ = true;
  main_thread_->loop().call([this] {
    // Exports first, so no client writes while the nodes are flushed and closed.
    qapi::stop_all_exports(*context_);
    context_->run_nested([](Context& context) -> Task<bool> {
      // Jobs still running (an image being created) stop first: they may write to nodes.
      co_await context.jobs().cancel_all();
      co_await flush_all(context.graph().nodes());
      co_return true;
    }(*context_));
    context_->graph().clear();
    context_->objects().clear();
  });
  context_->request_shutdown();
  main_thread_.reset();
}

}  // namespace blockd::qmp
