// Handlers of the block graph commands: blockdev-add, blockdev-del, query-named-block-nodes.
//
// blockdev-add translates the schema's BlockdevOptions into each driver's own options struct, so
// that drivers never see QAPI types, and resolves child references: a string names an existing
// node, an object opens a new implicit node owned by its parent.
#include "drivers/file.h"
#include "drivers/null.h"
#include "drivers/raw.h"
#include "qapi/commands.h"
#include "qmp/context.h"

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
    default:
      return Status::generic("Driver '" + std::string(to_string(options.driver)) +
                             "' is not supported by blockd yet");
  }
  return node;
}

}  // namespace

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
  return context.graph().remove(args.node_name);
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
    infos.push_back(std::move(info));
  }
  return infos;
}

}  // namespace blockd::qapi
