// Handlers of the QOM object commands: object-add (iothread, tls-creds-x509, tls-creds-psk),
// object-del, query-iothreads.
#include <cctype>

#include "qapi/commands.h"
#include "qmp/context.h"

namespace blockd::qapi {
namespace {

bool is_identifier(const std::string& id) {
  if (id.empty() || !std::isalpha(static_cast<unsigned char>(id[0]))) return false;
  for (char c : id) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.' && c != '_') {
      return false;
    }
  }
  return true;
}

Status add_iothread(qmp::Context& context, const std::string& id,
                    const IothreadProperties& properties) {
  // QEMU's defaults: adaptive polling up to 32 µs, batches as large as the ring allows (0).
  const int64_t poll_max_ns = properties.poll_max_ns.value_or(32768);
  const int64_t poll_grow = properties.poll_grow.value_or(0);
  const int64_t poll_shrink = properties.poll_shrink.value_or(0);
  const int64_t aio_max_batch = properties.aio_max_batch.value_or(0);
  if (poll_max_ns < 0 || poll_grow < 0 || poll_shrink < 0 || aio_max_batch < 0) {
    return Status::generic("iothread properties must not be negative");
  }
  auto thread = LoopThread::start("IO " + id);
  if (!thread) return thread.status();
  context.objects().emplace(
      id, std::make_unique<qmp::IoThread>(std::move(thread).value(), poll_max_ns, poll_grow,
                                          poll_shrink, aio_max_batch));
  return Status::ok();
}

// QEMU's default endpoint is the client.
tls::Endpoint to_endpoint(const std::optional<QCryptoTLSCredsEndpoint>& endpoint) {
  return endpoint == QCryptoTLSCredsEndpoint::kServer ? tls::Endpoint::kServer
                                                      : tls::Endpoint::kClient;
}

Status add_tls_creds_x509(qmp::Context& context, const std::string& id,
                          const TlsCredsX509Properties& properties) {
  // blockd has no secret objects, so a key protected by one cannot be unlocked.
  if (properties.passwordid) {
    return Status::generic("No secret with id '" + *properties.passwordid + "'");
  }
  tls::X509Options options;
  options.dir = properties.dir.value_or("");
  options.endpoint = to_endpoint(properties.endpoint);
  options.verify_peer = properties.verify_peer.value_or(true);
  options.priority = properties.priority.value_or("");
  options.sanity_check = properties.sanity_check.value_or(true);
  auto credentials = tls::Credentials::load_x509(options);
  if (!credentials) return credentials.status();
  context.objects().emplace(
      id, std::make_unique<qmp::TlsCredsObject>(std::move(credentials).value()));
  return Status::ok();
}

Status add_tls_creds_psk(qmp::Context& context, const std::string& id,
                         const TlsCredsPskProperties& properties) {
  tls::PskOptions options;
  options.dir = properties.dir.value_or("");
  options.endpoint = to_endpoint(properties.endpoint);
  options.username = properties.username.value_or("");
  options.priority = properties.priority.value_or("");
  auto credentials = tls::Credentials::load_psk(options);
  if (!credentials) return credentials.status();
  context.objects().emplace(id,
                            std::make_unique<qmp::TlsCredsObject>(std::move(credentials).value()));
  return Status::ok();
}

}  // namespace

Status qmp_object_add(qmp::Context& context, const ObjectOptions& options) {
  if (!is_identifier(options.id)) return Status::generic("Parameter 'id' expects an identifier");
  if (context.objects().contains(options.id)) {
    return Status::generic("attempt to add duplicate property '" + options.id +
                           "' to object (type 'container')");
  }
  if (options.u.iothread) return add_iothread(context, options.id, *options.u.iothread);
  if (options.u.tls_creds_psk) return add_tls_creds_psk(context, options.id, *options.u.tls_creds_psk);
  if (options.u.tls_creds_x509) {
    return add_tls_creds_x509(context, options.id, *options.u.tls_creds_x509);
  }
  return Status::generic("object type '" + std::string(to_string(options.qom_type)) +
                         "' is not supported by blockd yet");
}

Status qmp_object_del(qmp::Context& context, const ObjectDelArgs& args) {
  auto it = context.objects().find(args.id);
  if (it == context.objects().end()) return Status::generic("object '" + args.id + "' not found");
  // An iothread that still runs a node (an NBD export moved it there) must stay: stopping it would
  // strand the node's requests. (QEMU 7.2 deletes it anyway and aborts on the next request; blockd
  // refuses with QEMU's message for objects in use.)
  if (auto* iothread = dynamic_cast<qmp::IoThread*>(it->second.get())) {
    Loop& loop = iothread->thread().loop();
    for (const auto& node : context.graph().nodes()) {
      if (&node->loop() == &loop) {
        return Status::generic("object '" + args.id + "' is in use, can not be deleted");
      }
    }
  }
  context.objects().erase(it);
  return Status::ok();
}

Expected<std::vector<IOThreadInfo>> qmp_query_iothreads(qmp::Context& context) {
  std::vector<IOThreadInfo> threads;
  for (auto& [id, object] : context.objects()) {
    auto* iothread = dynamic_cast<qmp::IoThread*>(object.get());
    if (iothread == nullptr) continue;
    IOThreadInfo info;
    info.id = id;
    info.thread_id = iothread->thread().thread_id();
    info.poll_max_ns = iothread->poll_max_ns;
    info.poll_grow = iothread->poll_grow;
    info.poll_shrink = iothread->poll_shrink;
    info.aio_max_batch = iothread->aio_max_batch;
    threads.push_back(std::move(info));
  }
  return threads;
}

}  // namespace blockd::qapi
