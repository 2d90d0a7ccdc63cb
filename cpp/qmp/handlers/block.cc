// Handlers of the block graph commands: blockdev-add, blockdev-del, query-named-block-nodes.
//
// blockdev-add translates the schema's BlockdevOptions into each driver's own options struct, so
// that drivers never see QAPI types, and resolves child references: a string names an existing
// node, an object opens a new implicit node owned by its parent.
#include <cstdio>
#include <cstring>

#include "drivers/blkdebug.h"
#include "drivers/file.h"
#include "drivers/nbd/client.h"
#include "drivers/null.h"
#include "drivers/qcow2/qcow2.h"
#include "drivers/quorum.h"
#include "drivers/raw.h"
#include "qapi/commands.h"
#include "qapi/events.h"
#include "qapi/visit.h"
#include "qmp/context.h"
#include "qmp/handlers/snapshots.h"
#include "qmp/handlers/socket_address.h"

namespace blockd::qapi {
namespace {

using block::Node;
using block::NodeOptions;

// Options a child inherits from its parent when it does not set them itself.
struct Inherited {
  bool read_only = false;
  bool auto_read_only = false;
  bool cache_direct = false;
  bool cache_no_flush = false;
  std::string discard = "ignore";
};

Expected<std::shared_ptr<Node>> open_node(qmp::Context& context, const BlockdevOptions& options,
                                          const Inherited& inherited);

Expected<std::shared_ptr<Node>> resolve_child(qmp::Context& context, const BlockdevRef& ref,
                                              const Inherited& inherited) {
  if (const auto* name = std::get_if<std::string>(&ref)) {
    auto node = context.graph().find(*name);
    if (!node) {
      return Status::generic("Cannot find device='" + *name + "' nor node-name='" + *name + "'");
    }
    // A new parent opens on the main loop; it cannot share a child that an export has taken to
    // an iothread (QEMU would move the parent there too).
    if (&node->loop() != &context.main_loop()) {
      return Status::generic("Node '" + *name +
                             "' is exported from an iothread and cannot get another parent");
    }
    return node;
  }
  auto node = open_node(context, *std::get<Box<BlockdevOptions>>(ref), inherited);
  if (node) context.graph().add(*node, /*monitor_owned=*/false);
  return node;
}

Expected<NodeOptions> common_options(qmp::Context& context, const BlockdevOptions& options,
                                     const Inherited& inherited) {
  NodeOptions common;
  if (options.node_name) {
    BLOCKD_RETURN_IF_ERROR(block::validate_node_name(*options.node_name));
    common.node_name = *options.node_name;
  } else {
    common.node_name = context.graph().generate_node_name();
  }
  BLOCKD_RETURN_IF_ERROR(context.graph().check_name_free(common.node_name));
  common.read_only = options.read_only.value_or(inherited.read_only);
  common.auto_read_only = options.auto_read_only.value_or(inherited.auto_read_only);
  common.force_share = options.force_share.value_or(false);
  if (common.force_share && !common.read_only) {
    return Status::generic("force-share=on can only be used with read-only images");
  }
  common.cache_direct = inherited.cache_direct;
  common.cache_no_flush = inherited.cache_no_flush;
  if (options.cache) {
    common.cache_direct = options.cache->direct.value_or(common.cache_direct);
    common.cache_no_flush = options.cache->no_flush.value_or(common.cache_no_flush);
  }
  common.discard = inherited.discard;
  if (options.discard) common.discard = std::string(to_string(*options.discard));
  if (options.detect_zeroes) common.detect_zeroes = std::string(to_string(*options.detect_zeroes));
  return common;
}

// Turns the quorum driver's reports into QUORUM_REPORT_BAD / QUORUM_FAILURE events.
drivers::QuorumEventSink quorum_events(qmp::EventBus& bus) {
  return [&bus](const drivers::QuorumEvent& event) {
    if (event.kind == drivers::QuorumEvent::Kind::kFailure) {
      emit_quorum_failure(bus, QuorumFailureEvent{event.node_name, event.sector_num,
                                                  event.sectors_count});
      return;
    }
    QuorumReportBadEvent data;
    switch (event.op) {
      case drivers::QuorumEvent::Op::kRead:
        data.type = QuorumOpType::kRead;
        break;
      case drivers::QuorumEvent::Op::kWrite:
        data.type = QuorumOpType::kWrite;
        break;
      case drivers::QuorumEvent::Op::kFlush:
        data.type = QuorumOpType::kFlush;
        break;
    }
    data.error = event.error;
    data.node_name = event.node_name;
    data.sector_num = event.sector_num;
    data.sectors_count = event.sectors_count;
    emit_quorum_report_bad(bus, data);
  };
}

Expected<std::shared_ptr<Node>> open_quorum(qmp::Context& context, NodeOptions common,
                                            const BlockdevOptionsQuorum& quorum,
                                            const Inherited& for_children) {
  drivers::QuorumOptions options;
  options.vote_threshold = quorum.vote_threshold;
  options.blkverify = quorum.blkverify;
  options.rewrite_corrupted = quorum.rewrite_corrupted;
  if (quorum.read_pattern) {
    options.read_pattern = *quorum.read_pattern == QuorumReadPattern::kFifo
                               ? drivers::QuorumOptions::ReadPattern::kFifo
                               : drivers::QuorumOptions::ReadPattern::kQuorum;
  }
  options.events = quorum_events(context.events());
  // The options are checked before any child is opened, as in QEMU.
  BLOCKD_RETURN_IF_ERROR(drivers::validate_quorum_options(options, quorum.children.size()));
  std::vector<std::shared_ptr<Node>> children;
  for (const BlockdevRef& ref : quorum.children) {
    auto child = resolve_child(context, ref, for_children);
    if (!child) return child.status();
    children.push_back(std::move(child).value());
  }
  return drivers::open_quorum_node(std::move(common), std::move(options), std::move(children),
                                   context.main_loop());
}

Expected<std::shared_ptr<Node>> open_blkdebug(qmp::Context& context, NodeOptions common,
                                              const BlockdevOptionsBlkdebug& blkdebug,
                                              const Inherited& for_children) {
  auto refuse = [](const char* option) {
    return Status::generic(std::string("blkdebug option '") + option +
                           "' is not supported by blockd (use inject-error and set-state)");
  };
  if (blkdebug.config) return refuse("config");
  if (blkdebug.align) return refuse("align");
  if (blkdebug.max_transfer) return refuse("max-transfer");
  if (blkdebug.opt_write_zero) return refuse("opt-write-zero");
  if (blkdebug.max_write_zero) return refuse("max-write-zero");
  if (blkdebug.opt_discard) return refuse("opt-discard");
  if (blkdebug.max_discard) return refuse("max-discard");
  if (blkdebug.take_child_perms) return refuse("take-child-perms");
  if (blkdebug.unshare_child_perms) return refuse("unshare-child-perms");
  drivers::BlkdebugOptions options;
  for (const BlkdebugInjectErrorOptions& rule : blkdebug.inject_error.value_or(
           std::vector<BlkdebugInjectErrorOptions>{})) {
    drivers::BlkdebugInjectError inject;
    inject.event = std::string(to_string(rule.event));
    inject.state = rule.state.value_or(0);
    if (rule.iotype) inject.iotype = static_cast<drivers::BlkdebugIoType>(*rule.iotype);
    inject.error = rule.errno_.value_or(EIO);
    inject.sector = rule.sector.value_or(-1);
    inject.once = rule.once.value_or(false);
    inject.immediately = rule.immediately.value_or(false);
    options.inject_error.push_back(std::move(inject));
  }
  for (const BlkdebugSetStateOptions& rule :
       blkdebug.set_state.value_or(std::vector<BlkdebugSetStateOptions>{})) {
    options.set_state.push_back(drivers::BlkdebugSetState{std::string(to_string(rule.event)),
                                                          rule.state.value_or(0), rule.new_state});
  }
  auto rules_json = [](const auto& rules) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& rule : rules) list.push_back(to_json(rule));
    return list;
  };
  if (blkdebug.inject_error) options.given_rules["inject-error"] = rules_json(*blkdebug.inject_error);
  if (blkdebug.set_state) options.given_rules["set-state"] = rules_json(*blkdebug.set_state);
  auto image = resolve_child(context, blkdebug.image, for_children);
  if (!image) return image.status();
  return drivers::open_blkdebug_node(std::move(common), std::move(options),
                                     std::move(image).value(), context.main_loop());
}

Expected<std::shared_ptr<Node>> open_node(qmp::Context& context, const BlockdevOptions& options,
                                          const Inherited& inherited) {
  auto common = common_options(context, options, inherited);
  if (!common) return common.status();
  Inherited for_children{common->read_only, common->auto_read_only, common->cache_direct,
                         common->cache_no_flush, common->discard};
  Expected<std::shared_ptr<Node>> node = Status::generic("unreachable");
  switch (options.driver) {
    case BlockdevDriver::kFile: {
      const BlockdevOptionsFile& file = *options.u.file;
      if (file.pr_manager) {
        return Status::generic("Persistent reservation managers are not supported by blockd");
      }
      if (file.x_check_cache_dropped.value_or(false)) {
        return Status::generic("x-check-cache-dropped is not supported by blockd");
      }
      drivers::FileOptions driver_options;
      driver_options.filename = file.filename;
      if (file.aio) {
        switch (*file.aio) {
          case BlockdevAioOptions::kThreads:
            driver_options.aio = drivers::FileOptions::Aio::kThreads;
            break;
          case BlockdevAioOptions::kNative:
            driver_options.aio = drivers::FileOptions::Aio::kNative;
            break;
          case BlockdevAioOptions::kIoUring:
            driver_options.aio = drivers::FileOptions::Aio::kIoUring;
            break;
        }
      }
      if (file.locking) {
        switch (*file.locking) {
          case OnOffAuto::kAuto:
            driver_options.locking = drivers::FileOptions::Locking::kAuto;
            break;
          case OnOffAuto::kOn:
            driver_options.locking = drivers::FileOptions::Locking::kOn;
            break;
          case OnOffAuto::kOff:
            driver_options.locking = drivers::FileOptions::Locking::kOff;
            break;
        }
      }
      if (file.aio_max_batch) driver_options.aio_max_batch = *file.aio_max_batch;
      if (file.drop_cache) driver_options.drop_cache = *file.drop_cache;
      node =
          drivers::open_file_node(std::move(common).value(), driver_options, context.main_loop());
      break;
    }
    case BlockdevDriver::kRaw: {
      const BlockdevOptionsRaw& raw = *options.u.raw;
      auto child = resolve_child(context, raw.file, for_children);
      if (!child) return child.status();
      drivers::RawOptions driver_options;
      driver_options.offset = raw.offset;
      driver_options.size = raw.size;
      node = drivers::open_raw_node(std::move(common).value(), driver_options,
                                    std::move(child).value(), context.main_loop());
      break;
    }
    case BlockdevDriver::kQcow2: {
      const BlockdevOptionsQcow2& qcow2 = *options.u.qcow2;
      if (qcow2.encrypt) return Status::generic("qcow2 encryption is not supported by blockd");
      if (qcow2.data_file) return Status::generic("qcow2 data files are not supported by blockd");
      auto child = resolve_child(context, qcow2.file, for_children);
      if (!child) return child.status();
      drivers::Qcow2Options driver_options;
      driver_options.lazy_refcounts = qcow2.lazy_refcounts;
      driver_options.pass_discard_request = qcow2.pass_discard_request;
      driver_options.pass_discard_snapshot = qcow2.pass_discard_snapshot;
      driver_options.pass_discard_other = qcow2.pass_discard_other;
      driver_options.cache_size = qcow2.cache_size;
      driver_options.l2_cache_size = qcow2.l2_cache_size;
      driver_options.refcount_cache_size = qcow2.refcount_cache_size;
      if (qcow2.backing) {
        driver_options.backing_given = true;
        if (!std::holds_alternative<std::nullptr_t>(*qcow2.backing)) {
          const BlockdevRefOrNull& ref = *qcow2.backing;
          BlockdevRef as_ref = std::holds_alternative<std::string>(ref)
                                   ? BlockdevRef(std::get<std::string>(ref))
                                   : BlockdevRef(std::get<Box<BlockdevOptions>>(ref));
          Inherited read_only_backing = for_children;
          read_only_backing.read_only = true;
          auto backing = resolve_child(context, as_ref, read_only_backing);
          if (!backing) return backing.status();
          driver_options.backing = std::move(backing).value();
        }
      }
      // A backing file named by the image opens read-only with the format it records (or
      // qcow2 if its magic says so, else raw).
      drivers::OpenBackingFile open_backing =
          [&](const std::string& filename,
              const std::string& format) -> Expected<std::shared_ptr<Node>> {
        BlockdevOptions file_options;
        file_options.driver = BlockdevDriver::kFile;
        file_options.u.file.emplace();
        file_options.u.file->filename = filename;
        BlockdevOptions format_options;
        std::string chosen = format;
        if (chosen.empty()) {
          char magic[4] = {};
          if (FILE* f = std::fopen(filename.c_str(), "rb")) {
            if (std::fread(magic, 1, 4, f) != 4) magic[0] = 0;
            std::fclose(f);
          }
          chosen = std::memcmp(magic, "QFI\xfb", 4) == 0 ? "qcow2" : "raw";
        }
        Inherited read_only_backing = for_children;
        read_only_backing.read_only = true;
        if (chosen == "qcow2") {
          format_options.driver = BlockdevDriver::kQcow2;
          format_options.u.qcow2.emplace();
          format_options.u.qcow2->file = Box<BlockdevOptions>(std::move(file_options));
        } else if (chosen == "raw") {
          format_options.driver = BlockdevDriver::kRaw;
          format_options.u.raw.emplace();
          format_options.u.raw->file = Box<BlockdevOptions>(std::move(file_options));
        } else {
          return Status::generic("Unknown driver '" + chosen + "'");
        }
        auto opened = open_node(context, format_options, read_only_backing);
        if (opened) context.graph().add(*opened, /*monitor_owned=*/false);
        return opened;
      };
      node = drivers::open_qcow2_node(
          std::move(common).value(), driver_options, std::move(child).value(), open_backing,
          context.main_loop(), [&](Task<Status> task) { return context.run_nested(std::move(task)); });
      break;
    }
    case BlockdevDriver::kNullCo: {
      const BlockdevOptionsNull& null = *options.u.null_co;
      drivers::NullOptions driver_options;
      if (null.size) driver_options.size = *null.size;
      if (null.latency_ns) driver_options.latency_ns = *null.latency_ns;
      driver_options.read_zeroes = null.read_zeroes;
      node =
          drivers::open_null_node(std::move(common).value(), driver_options, context.main_loop());
      break;
    }
    case BlockdevDriver::kQuorum:
      node = open_quorum(context, std::move(common).value(), *options.u.quorum, for_children);
      break;
    case BlockdevDriver::kBlkdebug:
      node = open_blkdebug(context, std::move(common).value(), *options.u.blkdebug, for_children);
      break;
    case BlockdevDriver::kNbd: {
      const BlockdevOptionsNbd& nbd = *options.u.nbd;
      // As QEMU, the credentials are checked before anything is connected.
      std::shared_ptr<const tls::Credentials> tls_credentials;
      std::string tls_hostname;
      if (nbd.tls_creds) {
        auto found = context.tls_credentials(*nbd.tls_creds, tls::Endpoint::kClient);
        if (!found) return found.status();
        tls_credentials = std::move(found).value();
        // The server's certificate is checked against tls-hostname, else the host connected to.
        tls_hostname = nbd.tls_hostname.value_or("");
        if (tls_hostname.empty() && nbd.server.type == SocketAddressType::kInet &&
            nbd.server.u.inet) {
          tls_hostname = nbd.server.u.inet->host;
        }
        if (tls_hostname.empty() && tls_credentials->kind() == tls::Credentials::Kind::kX509 &&
            tls_credentials->verify_peer()) {
          return Status::generic("No hostname for certificate validation");
        }
      }
      if (nbd.x_dirty_bitmap) return Status::generic("x-dirty-bitmap is not supported by blockd");
      auto server = to_stream_address(nbd.server);
      if (!server) return server.status();
      drivers::NbdClientOptions driver_options;
      driver_options.server = std::move(server).value();
      driver_options.export_name = nbd.export_.value_or("");
      driver_options.reconnect_delay = nbd.reconnect_delay.value_or(0);
      driver_options.open_timeout = nbd.open_timeout.value_or(0);
      driver_options.tls_credentials = std::move(tls_credentials);
      driver_options.tls_hostname = std::move(tls_hostname);
      node = context.run_nested(drivers::open_nbd_node(std::move(common).value(),
                                                       std::move(driver_options),
                                                       context.main_loop()));
      break;
    }
    default:
      return Status::generic("Driver '" + std::string(to_string(options.driver)) +
                             "' is not supported by blockd yet");
  }
  return node;
}

// The qcow2 parts of a node's image info, as QEMU reports them.
void describe_qcow2(const Node& node, const drivers::Qcow2Snapshots& qcow2, BlockDeviceInfo& info) {
  const drivers::qcow2::Header& header = qcow2.header();
  info.image.cluster_size = static_cast<int64_t>(header.cluster_size());
  info.image.dirty_flag = (header.incompatible_features & drivers::qcow2::kIncompatDirty) != 0;
  if (!header.backing_file.empty()) {
    info.backing_file = header.backing_file;
    info.image.backing_filename = header.backing_file;
    if (!header.backing_format().empty()) {
      info.image.backing_filename_format = header.backing_format();
    }
  }
  // The backing chain: its length, and the first backing node's file name.
  for (const Node* n = &node; n;) {
    const Node* next = nullptr;
    for (const auto& child : n->children()) {
      if (child->name() == "backing") next = child->node();
    }
    if (next && n == &node) info.image.full_backing_filename = next->filename();
    if (next) ++info.backing_file_depth;
    n = next;
  }
  const auto snapshots = qcow2.snapshots();
  if (!snapshots.empty()) {
    std::vector<SnapshotInfo> list;
    for (const auto& s : snapshots) list.push_back(snapshot_info(s));
    info.image.snapshots = std::move(list);
  }
  ImageInfoSpecificQCow2 specific;
  specific.compat = header.version >= drivers::qcow2::kVersion3 ? "1.1" : "0.10";
  specific.refcount_bits = int64_t{1} << header.refcount_order;
  specific.compression_type = Qcow2CompressionType::kZlib;
  if (header.version >= drivers::qcow2::kVersion3) {
    specific.lazy_refcounts =
        (header.compatible_features & drivers::qcow2::kCompatLazyRefcounts) != 0;
    specific.corrupt = (header.incompatible_features & drivers::qcow2::kIncompatCorrupt) != 0;
    specific.extended_l2 = false;
  }
  ImageInfoSpecific wrapper;
  wrapper.type = ImageInfoSpecificKind::kQcow2;
  wrapper.u.qcow2.emplace();
  wrapper.u.qcow2->data = std::move(specific);
  info.image.format_specific = std::move(wrapper);
}

}  // namespace

Expected<std::shared_ptr<block::Node>> open_blockdev_ref(qmp::Context& context,
                                                         const BlockdevRef& ref) {
  return resolve_child(context, ref, Inherited{});
}

Status qmp_blockdev_add(qmp::Context& context, const BlockdevOptions& options) {
  if (!options.node_name) {
    return Status::generic("'node-name' must be specified for the root node");
  }
  auto node = open_node(context, options, Inherited{});
  if (!node) return node.status();
  context.graph().add(*node, /*monitor_owned=*/true);
  return Status::ok();
}

Status qmp_blockdev_del(qmp::Context& context, const BlockdevDelArgs& args) {
  // Write back what a node still caches (qcow2 metadata) before it closes, as QEMU does.
  if (auto node = context.graph().find(args.node_name); node && node->users().empty()) {
    if (&node->loop() == &context.main_loop()) {
      (void)context.run_nested(node->flush());
    } else {
      (void)node->loop().run_task(node->flush());
    }
  }
  return context.graph().remove(args.node_name);
}

Status qmp_x_blockdev_change(qmp::Context& context, const XBlockdevChangeArgs& args) {
  auto parent = context.graph().find(args.parent);
  if (!parent) {
    return Status::generic("Cannot find device='" + args.parent + "' nor node-name='" +
                           args.parent + "'");
  }
  if (args.child && args.node) {
    return Status::generic("The parameters child and node are in conflict");
  }
  if (args.child) {
    for (const auto& edge : parent->children()) {
      if (edge->name() != *args.child) continue;
      const std::string removed = edge->node()->node_name();
      BLOCKD_RETURN_IF_ERROR(parent->remove_dynamic_child(*edge));
      // A child the monitor still owns comes back to the main loop if the quorum ran elsewhere.
      if (auto node = context.graph().find(removed);
          node && &node->loop() != &context.main_loop() && node->users().empty()) {
        BLOCKD_RETURN_IF_ERROR(node->move_to_loop(context.main_loop(), nullptr));
      }
      return Status::ok();
    }
    return Status::generic("Node '" + args.parent + "' does not have child '" + *args.child +
                           "'");
  }
  if (args.node) {
    auto node = context.graph().find(*args.node);
    if (!node) return Status::generic("Node '" + *args.node + "' not found");
    return parent->add_dynamic_child(std::move(node));
  }
  return Status::generic("Either child or node must be specified");
}

Expected<std::vector<BlockDeviceInfo>> qmp_query_named_block_nodes(
    qmp::Context& context, const QueryNamedBlockNodesArgs&) {
  std::vector<BlockDeviceInfo> infos;
  for (const auto& node : context.graph().nodes()) {
    BlockDeviceInfo info;
    info.file = node->filename();
    info.node_name = node->node_name();
    info.ro = node->read_only();
    info.drv = std::string(node->driver_name());
    info.encrypted = false;
    parse_enum(node->options().detect_zeroes, info.detect_zeroes);
    info.cache.writeback = true;
    info.cache.direct = node->options().cache_direct;
    info.cache.no_flush = node->options().cache_no_flush;
    info.image.filename = info.file;
    info.image.format = info.drv;
    info.image.virtual_size = node->size();
    if (int64_t allocated = node->allocated_size(); allocated >= 0) {
      info.image.actual_size = allocated;
    }
    if (node->driver_name() != "null-co") info.image.dirty_flag = false;
    if (auto* qcow2 = drivers::qcow2_snapshots(*node)) describe_qcow2(*node, *qcow2, info);
    infos.push_back(std::move(info));
  }
  return infos;
}

}  // namespace blockd::qapi
