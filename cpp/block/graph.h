// The node registry: every node by name, and which nodes the monitor owns.
//
// Nodes created by blockdev-add with a node-name are owned by the monitor until blockdev-del.
// Nodes created implicitly (an inline "file": {...}) are owned by their parent only and get a
// generated name ("#block123"), as in QEMU. Main loop only.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "block/node.h"

namespace blockd::block {

class Graph {
 public:
  // Returns a fresh generated node name.
  std::string generate_node_name();

  // Checks that `name` is free (QEMU's "Duplicate nodes with node-name=..." otherwise).
  Status check_name_free(const std::string& name) const;

  // Registers a newly opened node. `monitor_owned` nodes stay alive until remove().
  void add(const std::shared_ptr<Node>& node, bool monitor_owned);

  // The live node named `name`, or null.
  std::shared_ptr<Node> find(std::string_view name) const;

  // blockdev-del: drops the monitor's ownership of `name`. Fails if there is no such node, if the
  // monitor does not own it, or if it is still used by a parent or an export.
  Status remove(const std::string& name);

  // Every live node, most recently created first (the order QEMU lists them in).
  std::vector<std::shared_ptr<Node>> nodes() const;

  // Drops the monitor's ownership of every node (shutdown), parents before children.
  void clear();

 private:
  std::map<std::string, std::shared_ptr<Node>, std::less<>> owned_;
  // Creation order; pruned of dead entries lazily.
  mutable std::vector<std::weak_ptr<Node>> all_;
  uint64_t next_generated_ = 0;
};

}  // namespace blockd::block
