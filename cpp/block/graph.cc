#include "block/graph.h"

#include <algorithm>
#include <cstdio>

namespace blockd::block {

std::string Graph::generate_node_name() {
  for (;;) {
    char name[32];
    std::snprintf(name, sizeof name, "#block%03llu",
                  static_cast<unsigned long long>(next_generated_++));
    if (!find(name)) return name;
  }
}

Status Graph::check_name_free(const std::string& name) const {
  if (find(name)) return Status::generic("Duplicate nodes with node-name='" + name + "'");
  return Status::ok();
}

void Graph::add(const std::shared_ptr<Node>& node, bool monitor_owned) {
  all_.push_back(node);
  if (monitor_owned) owned_.emplace(node->node_name(), node);
}

std::shared_ptr<Node> Graph::find(std::string_view name) const {
  for (const auto& weak : all_) {
    auto node = weak.lock();
    if (node && node->node_name() == name) return node;
  }
  return nullptr;
}

Status Graph::remove(const std::string& name) {
  auto it = owned_.find(name);
  if (it == owned_.end()) {
    if (find(name)) return Status::generic("Node " + name + " is not owned by the monitor");
    return Status::generic("Failed to find node with node-name='" + name + "'");
  }
  if (!it->second->users().empty()) {
    return Status::generic("Block device " + name + " is in use");
  }
  owned_.erase(it);
  return Status::ok();
}

std::vector<std::shared_ptr<Node>> Graph::nodes() const {
  std::erase_if(all_, [](const std::weak_ptr<Node>& weak) { return weak.expired(); });
  std::vector<std::shared_ptr<Node>> out;
  for (auto it = all_.rbegin(); it != all_.rend(); ++it) {
    if (auto node = it->lock()) out.push_back(std::move(node));
  }
  return out;
}

void Graph::clear() {
  // Unused nodes first, repeatedly: a parent releases its children when it goes.
  while (!owned_.empty()) {
    bool progress = false;
    for (auto it = owned_.begin(); it != owned_.end();) {
      if (it->second->users().empty()) {
        it = owned_.erase(it);
        progress = true;
      } else {
        ++it;
      }
    }
    if (!progress) {
      owned_.clear();
      break;
    }
  }
}

}  // namespace blockd::block
