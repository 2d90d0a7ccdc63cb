// Handlers of the internal snapshot commands: blockdev-snapshot-internal-sync,
// blockdev-snapshot-delete-internal-sync and blockd's x-blockd-snapshot-revert-internal-sync.
//
// Checks and messages follow qemu-storage-daemon 7.2, in its order: the node must exist and be a
// root node; create then refuses read-only nodes, formats without snapshots, empty and used
// names; delete (and revert) need an id or a name and a snapshot matching both when both are
// given.
#include "qmp/handlers/snapshots.h"

#include <cerrno>

#include "drivers/qcow2/qcow2.h"
#include "qapi/commands.h"
#include "qmp/context.h"

namespace blockd::qapi {
namespace {

using block::Node;
using drivers::Qcow2Snapshots;

std::string str_or_null(const std::optional<std::string>& value) {
  return value ? *value : "null";
}

// The root node named `device`.
Expected<std::shared_ptr<Node>> root_node(qmp::Context& context, const std::string& device) {
  auto node = context.graph().find(device);
  if (!node) {
    return Status::generic("Cannot find device='" + device + "' nor node-name='" + device + "'");
  }
  for (const block::User* user : node->users()) {
    if (dynamic_cast<const block::Child*>(user)) return Status::generic("Need a root block node");
  }
  return node;
}

// Runs a snapshot operation on the node's loop to completion.
int run_on_node(qmp::Context& context, Node& node, Task<int> task) {
  if (&node.loop() == &context.main_loop()) return context.run_nested(std::move(task));
  return node.loop().run_task(std::move(task));
}

// Finds the snapshot matching `id` and/or `name` (both must match when both are given).
Expected<size_t> find_snapshot(Node& node, const std::string& device,
                               const std::optional<std::string>& id,
                               const std::optional<std::string>& name) {
  Qcow2Snapshots* snapshots = drivers::qcow2_snapshots(node);
  if (!snapshots) {
    return Status::generic("Failed to get a snapshot list: " + errno_text(-ENOTSUP));
  }
  const auto list = snapshots->snapshots();
  for (size_t i = 0; i < list.size(); ++i) {
    if ((!id || list[i].id == *id) && (!name || list[i].name == *name)) return i;
  }
  return Status::generic("Snapshot with id '" + str_or_null(id) + "' and name '" +
                         str_or_null(name) + "' does not exist on device '" + device + "'");
}

}  // namespace

SnapshotInfo snapshot_info(const drivers::qcow2::SnapshotEntry& entry) {
  SnapshotInfo info;
  info.id = entry.id;
  info.name = entry.name;
  info.vm_state_size = static_cast<int64_t>(entry.vm_state_size);
  info.date_sec = entry.date_sec;
  info.date_nsec = entry.date_nsec;
  info.vm_clock_sec = static_cast<int64_t>(entry.vm_clock_nsec / 1000000000);
  info.vm_clock_nsec = static_cast<int64_t>(entry.vm_clock_nsec % 1000000000);
  if (entry.icount != UINT64_MAX) info.icount = static_cast<int64_t>(entry.icount);
  return info;
}

Status qmp_blockdev_snapshot_internal_sync(qmp::Context& context,
                                           const BlockdevSnapshotInternal& args) {
  auto node = root_node(context, args.device);
  if (!node) return node.status();
  if ((*node)->read_only()) return Status::generic("Device '" + args.device + "' is read only");
  Qcow2Snapshots* snapshots = drivers::qcow2_snapshots(**node);
  if (!snapshots) {
    return Status::generic("Block format '" + std::string((*node)->driver_name()) +
                           "' used by device '" + args.device +
                           "' does not support internal snapshots");
  }
  if (args.name.empty()) return Status::generic("Name is empty");
  for (const auto& s : snapshots->snapshots()) {
    if (s.name == args.name) {
      return Status::generic("Snapshot with name '" + args.name + "' already exists on device '" +
                             args.device + "'");
    }
  }
  const int r = run_on_node(context, **node, snapshots->create_snapshot(args.name));
  if (r < 0) {
    return Status::generic("Failed to create snapshot '" + args.name + "' on device '" +
                           args.device + "': " + errno_text(r));
  }
  return Status::ok();
}

Expected<SnapshotInfo> qmp_blockdev_snapshot_delete_internal_sync(
    qmp::Context& context, const BlockdevSnapshotDeleteInternalSyncArgs& args) {
  auto node = root_node(context, args.device);
  if (!node) return node.status();
  if (!args.id && !args.name) return Status::generic("Name or id must be provided");
  auto index = find_snapshot(**node, args.device, args.id, args.name);
  if (!index) return index.status();
  Qcow2Snapshots* snapshots = drivers::qcow2_snapshots(**node);
  const SnapshotInfo info = snapshot_info(snapshots->snapshots()[*index]);
  // A read-only image cannot change its snapshot table (QEMU reports EPERM here).
  const int r = (*node)->read_only()
                    ? -EPERM
                    : run_on_node(context, **node, snapshots->delete_snapshot(*index));
  if (r < 0) {
    return Status::generic("Failed to remove snapshot from snapshot list: " + errno_text(r));
  }
  return info;
}

Expected<SnapshotInfo> qmp_x_blockd_snapshot_revert_internal_sync(
    qmp::Context& context, const XBlockdSnapshotRevertInternalSyncArgs& args) {
  auto node = root_node(context, args.device);
  if (!node) return node.status();
  if (!args.id && !args.name) return Status::generic("Name or id must be provided");
  auto index = find_snapshot(**node, args.device, args.id, args.name);
  if (!index) return index.status();
  if ((*node)->read_only()) return Status::generic("Device '" + args.device + "' is read only");
  Qcow2Snapshots* snapshots = drivers::qcow2_snapshots(**node);
  const auto entry = snapshots->snapshots()[*index];
  if (entry.disk_size != static_cast<uint64_t>((*node)->size())) {
    return Status::generic("Snapshot '" + entry.name + "' has a virtual size of " +
                           std::to_string(entry.disk_size) + " bytes, the image " +
                           std::to_string((*node)->size()) +
                           ": reverting to a snapshot of another size is not supported");
  }
  const int r = run_on_node(context, **node, snapshots->revert_snapshot(*index));
  if (r < 0) {
    return Status::generic("Failed to revert to snapshot '" + entry.name + "' on device '" +
                           args.device + "': " + errno_text(r));
  }
  return snapshot_info(entry);
}

}  // namespace blockd::qapi
