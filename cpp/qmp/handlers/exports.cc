// Handlers of the block export commands: nbd-server-start, nbd-server-stop, nbd-server-add,
// nbd-server-remove, block-export-add, block-export-del, query-block-exports; and the daemon's
// --nbd-server option.
//
// FUSE exports (type=fuse) are checked the same way up to the node, then as in qemu-storage-daemon's
// FUSE export: read-only node, mountpoint already exported, mountpoint not a regular file.
//
// The checks run in the order qemu-storage-daemon 7.2 runs them, so the same mistake gets the same
// error: export id, duplicate id, node, iothread, then the NBD server and the NBD-specific options.
#include <algorithm>
#include <cctype>

#include "exports/fuse/fuse_export.h"
#include "exports/nbd/server.h"
#include "exports/vhost_user/vhost_user_blk_export.h"
#include "qapi/commands.h"
#include "qapi/events.h"
#include "qmp/context.h"
#include "qmp/handlers/socket_address.h"

namespace blockd::qapi {
namespace {

SocketAddress from_legacy(const SocketAddressLegacy& legacy) {
  SocketAddress address;
  address.type = legacy.type;
  if (legacy.u.inet) address.u.inet = legacy.u.inet->data;
  if (legacy.u.unix_) address.u.unix_ = legacy.u.unix_->data;
  if (legacy.u.vsock) address.u.vsock = legacy.u.vsock->data;
  if (legacy.u.fd) address.u.fd = legacy.u.fd->data;
  return address;
}

Status start_nbd_server(qmp::Context& context, const SocketAddress& address,
                        const std::optional<std::string>& tls_creds,
                        const std::optional<std::string>& tls_authz,
                        const std::optional<uint32_t>& max_connections) {
  if (context.nbd_server()) return Status::generic("NBD server already running");
  exports::nbd::ServerOptions options;
  if (tls_creds) {
    auto credentials = context.tls_credentials(*tls_creds, tls::Endpoint::kServer);
    if (!credentials) return credentials.status();
    options.tls_credentials = std::move(credentials).value();
    // As in QEMU, the authorization object is looked up only when a client connects.
    options.tls_authz = tls_authz.value_or("");
  }
  auto listen = to_stream_address(address);
  if (!listen) return listen.status();
  options.max_connections = max_connections.value_or(0);
  auto server = exports::nbd::Server::start(context.main_loop(), *listen, options);
  if (!server) return server.status();
  context.nbd_server() = std::move(server).value();
  return Status::ok();
}

exports::Export* find_export(qmp::Context& context, const std::string& id) {
  for (const auto& candidate : context.exports()) {
    if (candidate->id() == id) return candidate.get();
  }
  return nullptr;
}

bool is_identifier(const std::string& id) {
  if (id.empty() || !std::isalpha(static_cast<unsigned char>(id[0]))) return false;
  for (char c : id) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.' && c != '_') {
      return false;
    }
  }
  return true;
}

// Removes `doomed` for good: drops its clients, drains it, releases its node, forgets it and
// announces BLOCK_EXPORT_DELETED (so the id is free again when the event arrives).
Task<void> finish_delete(qmp::Context& context, std::shared_ptr<exports::Export> doomed) {
  co_await doomed->shut_down();
  auto& list = context.exports();
  list.erase(std::remove(list.begin(), list.end(), doomed), list.end());
  BlockExportDeletedEvent event;
  event.id = doomed->id();
  emit_block_export_deleted(context.events(), event);
  context.exports_changed().notify_all();
}

// Starts removing `target`. As in QEMU, an export without clients is gone (and its event sent)
// when this returns; one with clients shows shutting-down until they have been dropped and their
// requests have finished.
void begin_delete(qmp::Context& context, exports::Export* target) {
  for (const auto& candidate : context.exports()) {
    if (candidate.get() == target) {
      context.main_loop().spawn(finish_delete(context, candidate));
      return;
    }
  }
}

// Waits (serving the loop) until no export satisfies `pending`.
template <typename Pending>
void wait_for_exports(qmp::Context& context, Pending pending) {
  context.run_nested([](qmp::Context& ctx, Pending still) -> Task<bool> {
    auto busy = [&] {
      return std::any_of(ctx.exports().begin(), ctx.exports().end(),
                         [&](const auto& entry) { return still(*entry); });
    };
    while (busy()) co_await ctx.exports_changed().wait();
    co_return true;
  }(context, pending));
}

Status remove_export(qmp::Context& context, const std::string& id,
                     std::optional<BlockExportRemoveMode> mode) {
  exports::Export* target = find_export(context, id);
  if (target == nullptr) return Status::generic("Export '" + id + "' is not found");
  if (target->shutting_down()) {
    return Status::generic("Export '" + id + "' is already shutting down");
  }
  if (mode.value_or(BlockExportRemoveMode::kSafe) == BlockExportRemoveMode::kSafe &&
      target->client_count() > 0) {
    return Status::generic("export '" + id + "' still in use");
  }
  begin_delete(context, target);
  return Status::ok();
}

// Deletes every NBD export (oldest first), waits until they are gone and stops the server.
void stop_nbd_server(qmp::Context& context) {
  std::vector<exports::Export*> doomed;
  for (const auto& candidate : context.exports()) {
    if (candidate->type_name() == "nbd" && !candidate->shutting_down()) {
      doomed.push_back(candidate.get());
    }
  }
  for (auto it = doomed.rbegin(); it != doomed.rend(); ++it) begin_delete(context, *it);
  wait_for_exports(context,
                   [](const exports::Export& entry) { return entry.type_name() == "nbd"; });
  context.run_nested([](exports::nbd::Server& server) -> Task<bool> {
    co_await server.stop();
    co_return true;
  }(*context.nbd_server()));
  context.nbd_server().reset();
}

struct NbdExportRequest {
  std::string id;
  std::string node_name;
  std::optional<std::string> iothread;
  bool fixed_iothread = false;
  bool allocation_depth = false;
  exports::nbd::NbdExportOptions options;
};

// The loop of the iothread object named `iothread`; null when no iothread is named.
Expected<Loop*> find_iothread(qmp::Context& context, const std::optional<std::string>& iothread) {
  if (!iothread) return static_cast<Loop*>(nullptr);
  auto it = context.objects().find(*iothread);
  auto* object = it == context.objects().end() ? nullptr : dynamic_cast<qmp::IoThread*>(it->second.get());
  if (object == nullptr) return Status::generic("iothread \"" + *iothread + "\" not found");
  return &object->thread().loop();
}

Status add_nbd_export(qmp::Context& context, const NbdExportRequest& request,
                      const std::shared_ptr<block::Node>& node) {
  auto found = find_iothread(context, request.iothread);
  if (!found) return found.status();
  Loop* iothread = *found;
  if (!context.nbd_server()) return Status::generic("NBD server not running");
  if (request.allocation_depth) {
    // QEMU would offer the qemu:allocation-depth metadata context; blockd does not have it yet.
    return Status::generic("allocation-depth is not supported by blockd yet");
  }
  auto created = context.nbd_server()->add_export(request.options, node);
  if (!created) return created.status();
  std::shared_ptr<exports::nbd::NbdExport> added = std::move(created).value();
  // Requests are served in the iothread once the node has moved there. A node that others use
  // stays where it is, as QEMU does without fixed-iothread; with it, the export fails.
  if (iothread != nullptr && &node->loop() != iothread) {
    Status moved = added->move_to(*iothread);
    if (!moved.is_ok() && request.fixed_iothread) {
      context.run_nested([](std::shared_ptr<exports::nbd::NbdExport> doomed) -> Task<bool> {
        co_await doomed->shut_down();
        co_return true;
      }(added));
      return moved;
    }
  }
  context.exports().insert(context.exports().begin(), std::move(added));
  return Status::ok();
}

// The FUSE checks and the export itself, served on the node's loop.
Status create_fuse_export(qmp::Context& context, const BlockExportOptions& options,
                          const std::shared_ptr<block::Node>& node) {
  const BlockExportOptionsFuse& fuse = *options.u.fuse;
  exports::fuse::FuseExportOptions request;
  request.id = options.id;
  request.mountpoint = fuse.mountpoint;
  request.writable = options.writable.value_or(false);
  request.writethrough = options.writethrough.value_or(false);
  request.growable = fuse.growable.value_or(false);
  switch (fuse.allow_other.value_or(FuseExportAllowOther::kAuto)) {
    case FuseExportAllowOther::kOff:
      request.allow_other = exports::fuse::AllowOther::kOff;
      break;
    case FuseExportAllowOther::kOn:
      request.allow_other = exports::fuse::AllowOther::kOn;
      break;
    case FuseExportAllowOther::kAuto:
      request.allow_other = exports::fuse::AllowOther::kAuto;
      break;
  }
  if (request.writable && node->read_only()) {
    return Status::generic("Cannot export read-only node as writable");
  }
  for (const auto& entry : context.exports()) {
    const auto* other = dynamic_cast<const exports::fuse::FuseExport*>(entry.get());
    if (other != nullptr && other->mountpoint() == request.mountpoint) {
      return Status::generic("There already is a FUSE export on '" + request.mountpoint + "'");
    }
  }
  auto created = exports::fuse::FuseExport::create(context.main_loop(), request, node);
  if (!created) return created.status();
  context.exports().insert(context.exports().begin(), std::move(created).value());
  return Status::ok();
}

using CreateExport = Status (*)(qmp::Context& context, const BlockExportOptions& options,
                                const std::shared_ptr<block::Node>& node);

// Adds an export that is served on its node's loop (FUSE, vhost-user-blk) with `create`, after
// moving the node to the iothread named in the options.
Status add_on_node_loop(qmp::Context& context, const BlockExportOptions& options,
                        const std::shared_ptr<block::Node>& node, CreateExport create) {
  auto found = find_iothread(context, options.iothread);
  if (!found) return found.status();
  Loop* iothread = *found;
  // As in QEMU, the node moves before the export's own checks, and back should they fail. It
  // moves only when nothing else uses it (QEMU would take along the users that allow it);
  // otherwise the export is served where the node is, or fails with fixed-iothread, in QEMU's
  // words.
  Loop& before = node->loop();
  if (iothread != nullptr && &before != iothread &&
      !node->move_to_loop(*iothread, nullptr).is_ok() && options.fixed_iothread.value_or(false)) {
    return Status::generic("Cannot change iothread of active block backend");
  }
  Status created = create(context, options, node);
  if (!created.is_ok() && &node->loop() != &before) (void)node->move_to_loop(before, nullptr);
  return created;
}

// The vhost-user-blk checks, as qemu-storage-daemon 7.2 makes them after the iothread: read-only
// node, logical-block-size, num-queues, then the socket address; and the export itself, served
// on the node's loop.
Status create_vhost_user_blk_export(qmp::Context& context, const BlockExportOptions& options,
                                    const std::shared_ptr<block::Node>& node) {
  const BlockExportOptionsVhostUserBlk& vhost = *options.u.vhost_user_blk;
  exports::vhost_user::VhostUserBlkExportOptions request;
  request.id = options.id;
  request.writable = options.writable.value_or(false);
  request.writethrough = options.writethrough.value_or(false);
  if (request.writable && node->read_only()) {
    return Status::generic("Cannot export read-only node as writable");
  }
  // 0 means "not set", as in QEMU's block size properties.
  const uint64_t block_size = vhost.logical_block_size.value_or(512);
  constexpr uint64_t kMinBlockSize = 512;
  constexpr uint64_t kMaxBlockSize = 2u << 20;
  if (block_size != 0 && (block_size < kMinBlockSize || block_size > kMaxBlockSize)) {
    return Status::generic("Property " + options.id + ".logical-block-size doesn't take value " +
                           std::to_string(block_size) + " (minimum: 512, maximum: 2097152)");
  }
  if ((block_size & (block_size - 1)) != 0) {
    return Status::generic("Property " + options.id + ".logical-block-size doesn't take value '" +
                           std::to_string(block_size) + "', it's not a power of 2");
  }
  request.logical_block_size = block_size == 0 ? 512 : static_cast<uint32_t>(block_size);
  request.num_queues = vhost.num_queues.value_or(1);
  if (request.num_queues == 0) return Status::generic("num-queues must be greater than 0");
  if (vhost.addr.type != SocketAddressType::kUnix && vhost.addr.type != SocketAddressType::kFd) {
    return Status::generic("Only socket address types 'unix' and 'fd' are supported");
  }
  auto listen = to_stream_address(vhost.addr);
  if (!listen) return listen.status();
  request.address = *listen;
  auto created = exports::vhost_user::VhostUserBlkExport::create(context.main_loop(), request, node);
  if (!created) return created.status();
  context.exports().insert(context.exports().begin(), std::move(created).value());
  return Status::ok();
}

}  // namespace

// For the daemon's --nbd-server option (Engine::cli_option).
Status nbd_server_start_options(qmp::Context& context, const NbdServerOptions& options) {
  return start_nbd_server(context, options.addr, options.tls_creds, options.tls_authz,
                          options.max_connections);
}

// Shuts every export down and stops the NBD server (Engine::shutdown).
void stop_all_exports(qmp::Context& context) {
  if (context.nbd_server()) stop_nbd_server(context);
  std::vector<exports::Export*> doomed;
  for (const auto& candidate : context.exports()) {
    if (!candidate->shutting_down()) doomed.push_back(candidate.get());
  }
  for (auto it = doomed.rbegin(); it != doomed.rend(); ++it) begin_delete(context, *it);
  wait_for_exports(context, [](const exports::Export&) { return true; });
}

Status qmp_nbd_server_start(qmp::Context& context, const NbdServerStartArgs& args) {
  return start_nbd_server(context, from_legacy(args.addr), args.tls_creds, args.tls_authz,
                          args.max_connections);
}

Status qmp_nbd_server_stop(qmp::Context& context) {
  if (!context.nbd_server()) return Status::generic("NBD server not running");
  stop_nbd_server(context);
  return Status::ok();
}

Status qmp_block_export_add(qmp::Context& context, const BlockExportOptions& options) {
  if (!is_identifier(options.id)) return Status::generic("Invalid block export id");
  if (find_export(context, options.id) != nullptr) {
    return Status::generic("Block export id '" + options.id + "' is already in use");
  }
  auto node = context.graph().find(options.node_name);
  if (!node) {
    return Status::generic("Cannot find device='' nor node-name='" + options.node_name + "'");
  }
  if (options.type == BlockExportType::kFuse) {
    return add_on_node_loop(context, options, node, create_fuse_export);
  }
  if (options.type == BlockExportType::kVhostUserBlk) {
    return add_on_node_loop(context, options, node, create_vhost_user_blk_export);
  }
  if (options.type != BlockExportType::kNbd) {
    return Status::generic("Export type '" + std::string(to_string(options.type)) +
                           "' is not supported by blockd yet");
  }
  const BlockExportOptionsNbd& nbd = *options.u.nbd;
  if (nbd.bitmaps && !nbd.bitmaps->empty()) {
    const auto& first = nbd.bitmaps->front();
    std::string bitmap_name;
    if (const auto* name = std::get_if<std::string>(&first)) {
      bitmap_name = *name;
    } else {
      bitmap_name = std::get<BlockDirtyBitmap>(first).name;
    }
    if (!options.iothread && context.nbd_server()) {
      return Status::generic("Bitmap '" + bitmap_name + "' is not found");
    }
  }
  NbdExportRequest request;
  request.id = options.id;
  request.node_name = options.node_name;
  request.iothread = options.iothread;
  request.fixed_iothread = options.fixed_iothread.value_or(false);
  request.allocation_depth = nbd.allocation_depth.value_or(false);
  request.options.id = options.id;
  request.options.name = nbd.name.value_or(options.node_name);
  request.options.description = nbd.description.value_or("");
  request.options.writable = options.writable.value_or(false);
  request.options.writethrough = options.writethrough.value_or(false);
  return add_nbd_export(context, request, node);
}

Status qmp_nbd_server_add(qmp::Context& context, const NbdServerAddOptions& options) {
  if (!context.nbd_server()) return Status::generic("NBD server not running");
  const std::string name = options.name.value_or(options.device);
  auto node = context.graph().find(options.device);
  if (!node) {
    return Status::generic("Cannot find device='" + options.device + "' nor node-name='" +
                           options.device + "'");
  }
  if (options.bitmap) return Status::generic("Bitmap '" + *options.bitmap + "' is not found");
  if (find_export(context, name) != nullptr) {
    return Status::generic("Block export id '" + name + "' is already in use");
  }
  NbdExportRequest request;
  request.id = name;
  request.node_name = options.device;
  request.options.id = name;
  request.options.name = name;
  request.options.description = options.description.value_or("");
  request.options.writable = options.writable.value_or(false);
  return add_nbd_export(context, request, node);
}

Status qmp_nbd_server_remove(qmp::Context& context, const NbdServerRemoveArgs& args) {
  return remove_export(context, args.name, args.mode);
}

Status qmp_block_export_del(qmp::Context& context, const BlockExportDelArgs& args) {
  return remove_export(context, args.id, args.mode);
}

Expected<std::vector<BlockExportInfo>> qmp_query_block_exports(qmp::Context& context) {
  std::vector<BlockExportInfo> infos;
  for (const auto& entry : context.exports()) {
    BlockExportInfo info;
    info.id = entry->id();
    parse_enum(entry->type_name(), info.type);
    info.node_name = entry->node_name();
    info.shutting_down = entry->shutting_down();
    infos.push_back(std::move(info));
  }
  return infos;
}

}  // namespace blockd::qapi
