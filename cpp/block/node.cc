#include "block/node.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <vector>

namespace blockd::block {

std::string permission_names(uint32_t mask) {
  static constexpr const char* kNames[] = {"consistent read", "write", "write unchanged", "resize"};
  std::string out;
  for (int bit = 0; bit < 4; ++bit) {
    if (!(mask & (1u << bit))) continue;
    if (!out.empty()) out += ", ";
    out += kNames[bit];
  }
  return out;
}

Status validate_node_name(std::string_view name) {
  auto well_formed = [](std::string_view id) {
    if (id.empty() || !std::isalpha(static_cast<unsigned char>(id[0]))) return false;
    return std::all_of(id.begin() + 1, id.end(), [](char c) {
      return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_';
    });
  };
  if (!well_formed(name)) return Status::generic("Invalid node-name: '" + std::string(name) + "'");
  if (name.size() >= 32) return Status::generic("Node name too long");
  return Status::ok();
}

Child::~Child() {
  if (node_ != nullptr) node_->detach(*this);
  // holder_ is released last: the child node may be destroyed with it.
}

std::string Child::user_description() const { return "node '" + parent_->node_name() + "'"; }

Node::Node(NodeOptions options) : options_(std::move(options)) { loop_ = Loop::current(); }

Node::~Node() {
  // Children go first so that each releases its permissions on the node below while this node is
  // still intact.
  children_.clear();
}

std::string Node::filename() const { return "json:" + open_options().dump(); }

void Node::set_loop(Loop& loop) noexcept { loop_ = &loop; }

Status Node::move_to_loop(Loop& loop, const User* owner) {
  // Collect the subtree, then check that every use of its nodes comes from inside it.
  std::vector<Node*> subtree{this};
  for (size_t i = 0; i < subtree.size(); ++i) {
    for (const auto& child : subtree[i]->children_) {
      Node* below = child->node();
      if (below != nullptr &&
          std::find(subtree.begin(), subtree.end(), below) == subtree.end()) {
        subtree.push_back(below);
      }
    }
  }
  for (Node* node : subtree) {
    for (const User* user : node->users_) {
      if (user == owner) continue;
      const auto* edge = dynamic_cast<const Child*>(user);
      if (edge != nullptr &&
          std::find(subtree.begin(), subtree.end(), edge->parent()) != subtree.end()) {
        continue;
      }
      return Status::generic("Node '" + node->node_name() + "' is also used by " +
                             user->user_description() + ", so it cannot move to another thread");
    }
  }
  for (Node* node : subtree) node->loop_ = &loop;
  return Status::ok();
}

Child* Node::file_child() const noexcept {
  for (const auto& child : children_) {
    if (child->name() == "file") return child.get();
  }
  return nullptr;
}

// ---- Default data-path behaviour.

Task<int64_t> Node::discard(uint64_t, uint64_t) noexcept { co_return 0; }

Task<int64_t> Node::truncate(uint64_t) noexcept { co_return -ENOTSUP; }

Task<int64_t> Node::write_zeroes(uint64_t offset, uint64_t length, uint32_t flags) noexcept {
  if (flags & kRequestNoFallback) co_return -ENOTSUP;
  static constexpr uint64_t kChunk = 1 << 20;
  static const std::vector<char> zeroes(kChunk, 0);
  while (length > 0) {
    const uint64_t now = std::min(length, kChunk);
    const int64_t ret = co_await write(offset, now, zeroes.data(), flags & kRequestFua);
    if (ret < 0) co_return ret;
    offset += now;
    length -= now;
  }
  co_return 0;
}

Task<BlockStatus> Node::block_status(uint64_t offset, uint64_t length) noexcept {
  const int64_t end = std::min<int64_t>(size(), offset + length);
  co_return BlockStatus{std::max<int64_t>(end - static_cast<int64_t>(offset), 0),
                        kStatusData | kStatusAllocated};
}

Task<int64_t> Node::cache(uint64_t, uint64_t) noexcept { co_return 0; }

FileRange Node::map_file(uint64_t, uint64_t, MapAccess) noexcept { return {}; }

Task<FileRange> Node::map_file_async(uint64_t offset, uint64_t length, MapAccess access) noexcept {
  co_return map_file(offset, length, access);
}

void Node::release_file(const FileRange&, MapAccess) noexcept {}

// ---- Permissions.
//
// A change is checked as a whole before anything is committed (QEMU's two-phase permission
// update): the changed use is compared with every other use of the node; then the node's combined
// needs are checked by the driver (image locks) and translated into what it needs from each child,
// recursively. Only when every level agrees is the plan applied.

struct Node::Change {
  Node* node;
  User* user;  // the use whose permissions change
  uint32_t permissions;
  uint32_t shared;
  uint32_t node_permissions;  // the node's combined needs after the change
  uint32_t node_shared;
};

void Node::combined_permissions(const User* replace, uint32_t replace_permissions,
                                uint32_t replace_shared, uint32_t& permissions,
                                uint32_t& shared) const {
  permissions = 0;
  shared = kPermAll;
  bool replaced = false;
  for (const User* user : users_) {
    if (user == replace) {
      replaced = true;
      permissions |= replace_permissions;
      shared &= replace_shared;
    } else {
      permissions |= user->permissions_;
      shared &= user->shared_;
    }
  }
  if (!replaced && replace != nullptr) {
    permissions |= replace_permissions;
    shared &= replace_shared;
  }
}

Status Node::check_change(const User* changing, uint32_t permissions, uint32_t shared,
                          std::vector<Change>& plan) {
  if ((permissions & (kPermWrite | kPermResize)) && read_only()) {
    return Status::generic("Block node '" + node_name() + "' is read-only");
  }
  // The wording follows QEMU's, so that scripts matching its conflict messages keep working.
  auto conflict = [this](uint32_t clash, const User& needs, const User& refuses) {
    auto use = [this](const User& user) {
      return user.user_description() + " (uses node '" + node_name() + "' as '" + user.role() +
             "' child)";
    };
    return Status::generic("Permission conflict on node '" + node_name() + "': permissions '" +
                           permission_names(clash) + "' are both required by " + use(needs) +
                           " and unshared by " + use(refuses) + ".");
  };
  for (const User* other : users_) {
    if (other == changing) continue;
    if (const uint32_t clash = permissions & ~other->shared_) {
      return conflict(clash, *changing, *other);
    }
    if (const uint32_t clash = other->permissions_ & ~shared) {
      return conflict(clash, *other, *changing);
    }
  }
  uint32_t node_permissions;
  uint32_t node_shared;
  combined_permissions(changing, permissions, shared, node_permissions, node_shared);
  BLOCKD_RETURN_IF_ERROR(check_permissions(node_permissions, node_shared));
  plan.push_back(Change{this, const_cast<User*>(changing), permissions, shared, node_permissions,
                        node_shared});
  for (const auto& child : children_) {
    uint32_t child_perm;
    uint32_t child_shared;
    child_permissions(*child, node_permissions, node_shared, child_perm, child_shared);
    if (child_perm == child->permissions_ && child_shared == child->shared_) continue;
    BLOCKD_RETURN_IF_ERROR(child->node_->check_change(child.get(), child_perm, child_shared, plan));
  }
  return Status::ok();
}

void Node::apply_plan(std::vector<Change>& plan) {
  for (Change& change : plan) {
    change.user->permissions_ = change.permissions;
    change.user->shared_ = change.shared;
    change.node->apply_permissions(change.node_permissions, change.node_shared);
  }
}

Status Node::attach(User& user, uint32_t permissions, uint32_t shared) {
  std::vector<Change> plan;
  BLOCKD_RETURN_IF_ERROR(check_change(&user, permissions, shared, plan));
  user.node_ = this;
  users_.push_back(&user);
  apply_plan(plan);
  return Status::ok();
}

Status Node::update_permissions(User& user, uint32_t permissions, uint32_t shared) {
  std::vector<Change> plan;
  BLOCKD_RETURN_IF_ERROR(check_change(&user, permissions, shared, plan));
  apply_plan(plan);
  return Status::ok();
}

void Node::detach(User& user) noexcept {
  auto it = std::find(users_.begin(), users_.end(), &user);
  if (it == users_.end()) return;
  users_.erase(it);
  user.node_ = nullptr;
  user.permissions_ = 0;
  user.shared_ = kPermAll;
  // Releasing permissions cannot conflict, so the recomputed needs are applied directly.
  uint32_t node_permissions;
  uint32_t node_shared;
  combined_permissions(nullptr, 0, kPermAll, node_permissions, node_shared);
  apply_permissions(node_permissions, node_shared);
  for (const auto& child : children_) {
    uint32_t child_perm;
    uint32_t child_shared;
    child_permissions(*child, node_permissions, node_shared, child_perm, child_shared);
    std::vector<Change> plan;
    if (child->node_->check_change(child.get(), child_perm, child_shared, plan)) apply_plan(plan);
  }
}

Expected<Child*> Node::add_child(std::string name, std::shared_ptr<Node> child_node) {
  auto child = std::make_unique<Child>(this, std::move(name));
  uint32_t node_permissions;
  uint32_t node_shared;
  combined_permissions(nullptr, 0, kPermAll, node_permissions, node_shared);
  uint32_t child_perm;
  uint32_t child_shared;
  child_permissions(*child, node_permissions, node_shared, child_perm, child_shared);
  BLOCKD_RETURN_IF_ERROR(child_node->attach(*child, child_perm, child_shared));
  child->holder_ = std::move(child_node);
  children_.push_back(std::move(child));
  return children_.back().get();
}

void Node::remove_child(Child& child) noexcept {
  auto it = std::find_if(children_.begin(), children_.end(),
                         [&](const std::unique_ptr<Child>& edge) { return edge.get() == &child; });
  if (it != children_.end()) children_.erase(it);
}

Status Node::add_dynamic_child(std::shared_ptr<Node>) {
  return Status::generic("The node " + node_name() + " does not support adding a child");
}

Status Node::remove_dynamic_child(Child&) {
  return Status::generic("The node " + node_name() + " does not support removing a child");
}

void Node::child_permissions(const Child&, uint32_t permissions, uint32_t shared,
                             uint32_t& child_permissions, uint32_t& child_shared) const {
  // Pass the users' needs through. A resize of the child is never shared: the node's size
  // depends on it.
  child_permissions = permissions;
  child_shared = (shared & ~kPermResize) | kPermWriteUnchanged;
}

Status Node::check_permissions(uint32_t, uint32_t) { return Status::ok(); }

void Node::apply_permissions(uint32_t, uint32_t) {}

}  // namespace blockd::block
